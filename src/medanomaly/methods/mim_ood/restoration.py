"""The restoration shared by ``mim-ood`` and ``token-critic``: a per-token selector (a binary token classifier, the
ATD or the Token Critic) picks the tokens to re-sample and a masked visual token model (MVTM) re-samples them,
T iterations, R restorations in one batch (:func:`medanomaly.nets.tokens.mim_restore`).

The two methods differ only in the selector's name and in how it is trained (:meth:`_fit_latent`); building the
networks, the token scores, the restoration and the MVTM likelihood scores are here, once.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from medanomaly.methods.mim_ood.common import TokenRestorationDetector, derive_defaults
from medanomaly.nets.tokens import TokenTransformer, mim_restore, mvtm_token_nll

__all__ = ["MVTMRestorationDetector"]


class MVTMRestorationDetector(TokenRestorationDetector):
    """Selector + MVTM restoration. Subclasses set ``selector`` (the name of the token classifier among
    ``latent_modules``, next to ``mvtm``) and implement ``_fit_latent``."""

    defaults: ClassVar[dict[str, Any]] = derive_defaults()
    #: the latent module whose sigmoid output is the token score (the probability that a token is anomalous)
    selector: ClassVar[str] = ""

    def _build_latent(self) -> dict[str, TokenTransformer]:
        k = int(self.params["tokenizer"]["num_embeddings"])
        return {self.selector: self._transformer(1), "mvtm": self._transformer(k)}

    def _token_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.nets[self.selector](tokens).squeeze(-1).float())

    def _restore(self, tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        rp = self.params["restoration"]
        return mim_restore(tokens, self._token_scores, self.nets["mvtm"], self.threshold, int(rp["T"]), int(rp["R"]),
                           float(rp["temperature"]), seed, self.logit_bias(tokens.device), progress=not self.quiet)

    def _extra_token_scores(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_scores_mvtm": mvtm_token_nll(self.nets["mvtm"], tokens, self.token_shape)}
