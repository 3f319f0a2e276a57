"""MVTM + Token Critic baseline (Lezama et al.) for anomaly detection: the critic, trained to tell MVTM-sampled
tokens from original ones, selects the tokens to re-sample in place of MIM-OOD's ATD (the restoration itself is
MIM-OOD's: :mod:`medanomaly.methods.mim_ood.restoration`)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from medanomaly.methods.base import register
from medanomaly.methods.mim_ood.common import critic_corruption, derive_schema, train_mvtm, train_token_classifier
from medanomaly.methods.mim_ood.restoration import MVTMRestorationDetector
from medanomaly.methods.params import Float
from medanomaly.nets.tokens import MaskBank

__all__ = ["TokenCritic"]


@register
class TokenCritic(MVTMRestorationDetector):
    """MVTM + Token Critic. Token scores: the critic's probability that a token was sampled (not original);
    with ``restoration.extra_token_scores`` also ``token_scores_mvtm``. ``reuse.modules`` may name ``mvtm``."""

    name: ClassVar[str] = "token-critic"
    selector: ClassVar[str] = "critic"
    latent_modules: ClassVar[tuple[str, ...]] = ("critic", "mvtm")
    #: the fixed threshold is a critic probability
    parameter_schema: ClassVar[dict[str, Any]] = derive_schema(latent_modules, **{"restoration.threshold.value": Float(0, 1)})

    def _fit_latent(self, tokens: torch.Tensor, val_tokens: torch.Tensor | None, reused: set[str]) -> None:
        kw, mp = self._train_kw(), self.params["masks"]
        rng = np.random.default_rng([int(self.params["seed"]), 7])
        bank = MaskBank(self.token_shape, int(mp["bank_size"]), rng, "cosine")
        if "mvtm" not in reused:
            self.train_log += train_mvtm(self.nets["mvtm"], tokens, val_tokens, bank, self.params["transformer_train"], **kw)
        mvtm = self.nets["mvtm"].to(self.device).eval()
        if "critic" not in reused:
            corrupt = critic_corruption(bank, mvtm, float(self.params["restoration"]["temperature"]),
                                        self.logit_bias(self.device))
            self.train_log += train_token_classifier(self.nets["critic"], tokens, val_tokens, corrupt,
                                                     self.params["transformer_train"], name="critic", **kw)
