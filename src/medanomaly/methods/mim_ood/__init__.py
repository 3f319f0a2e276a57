"""MIM-OOD: generative masked image modelling for out-of-distribution detection (registers ``mim-ood``)."""

from medanomaly.methods.mim_ood.method import MIMOOD

__all__ = ["MIMOOD"]
