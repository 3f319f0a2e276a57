"""MVTM + Token Critic restoration baseline (registers ``token-critic``)."""

from medanomaly.methods.token_critic.method import TokenCritic

__all__ = ["TokenCritic"]
