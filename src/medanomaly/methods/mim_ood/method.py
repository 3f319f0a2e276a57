"""MIM-OOD (Naval Marimont et al.): an Anomalous Token Detector picks tokens, a masked visual token model
(MVTM) re-samples them; T iterations, R restorations in one batch. See :mod:`.common` for the shared pipeline and
:mod:`.restoration` for the restoration it shares with ``token-critic``."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from medanomaly.methods.base import register
from medanomaly.methods.mim_ood.common import derive_schema, random_token_corruption, train_mvtm, train_token_classifier
from medanomaly.methods.mim_ood.restoration import MVTMRestorationDetector
from medanomaly.methods.params import Float
from medanomaly.nets.tokens import MaskBank

__all__ = ["MIMOOD"]


@register
class MIMOOD(MVTMRestorationDetector):
    """MIM-OOD. Token scores (``extras["token_scores"]``): ATD probability of each token being anomalous;
    with ``restoration.extra_token_scores`` also ``token_scores_mvtm`` (MVTM negative log-likelihood)."""

    name: ClassVar[str] = "mim-ood"
    selector: ClassVar[str] = "atd"
    latent_modules: ClassVar[tuple[str, ...]] = ("atd", "mvtm")
    #: the fixed threshold is an ATD probability
    parameter_schema: ClassVar[dict[str, Any]] = derive_schema(latent_modules, **{"restoration.threshold.value": Float(0, 1)})

    def _fit_latent(self, tokens: torch.Tensor, val_tokens: torch.Tensor | None, reused: set[str]) -> None:
        kw, mp = self._train_kw(), self.params["masks"]
        rng = np.random.default_rng([int(self.params["seed"]), 7])
        if "mvtm" not in reused:
            bank = MaskBank(self.token_shape, int(mp["bank_size"]), rng, "cosine")
            self.train_log += train_mvtm(self.nets["mvtm"], tokens, val_tokens, bank, self.params["transformer_train"], **kw)
        if "atd" not in reused:
            cbank = MaskBank(self.token_shape, int(mp["bank_size"]), rng, "uniform", float(mp["corrupt_low"]),
                             float(mp["corrupt_high"]))
            corrupt = random_token_corruption(cbank, self.used_ids)
            self.train_log += train_token_classifier(self.nets["atd"], tokens, val_tokens, corrupt,
                                                     self.params["transformer_train"], name="atd", **kw)
