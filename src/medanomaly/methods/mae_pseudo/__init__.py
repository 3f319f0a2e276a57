"""MAE + pseudo-abnormal module + residual classifier (seed paper 003, Georgescu)."""

from medanomaly.methods.mae_pseudo.detector import MAEPseudo, ResidualClassifier

__all__ = ["MAEPseudo", "ResidualClassifier"]
