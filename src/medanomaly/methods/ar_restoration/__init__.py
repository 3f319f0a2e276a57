"""Auto-regressive latent restoration baseline (registers ``ar-restoration``)."""

from medanomaly.methods.ar_restoration.method import ARRestoration

__all__ = ["ARRestoration"]
