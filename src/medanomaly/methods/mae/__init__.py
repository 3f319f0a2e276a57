"""The masked-autoencoder family's shared parts and the plain ``mae`` reconstruction detector."""

from medanomaly.methods.mae.detector import MAEDetector

__all__ = ["MAEDetector"]
