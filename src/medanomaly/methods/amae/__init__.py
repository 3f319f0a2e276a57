"""AMAE (seed paper 002): pre-trained MAE + AnatPaste proxy head (stage 1) + dual-distribution adaptation (stage 2)."""

from medanomaly.methods.amae.detector import AMAE, MLPHead, pseudo_label

__all__ = ["AMAE", "MLPHead", "pseudo_label"]
