"""AR restoration baseline (Naval Marimont & Tarroni, ISBI 2021, with a transformer): a causal transformer over
the raster order of tokens; tokens whose NLL exceeds a threshold are re-sampled position by position."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from medanomaly.methods.base import register
from medanomaly.methods.mim_ood.common import TokenRestorationDetector, derive_defaults, derive_schema, train_ar
from medanomaly.nets.tokens import TokenTransformer, ar_restore, ar_token_nll

__all__ = ["ARRestoration"]


@register
class ARRestoration(TokenRestorationDetector):
    """AR restoration. Token scores: NLL of each token given the original raster prefix. ``restoration.T`` is
    unused (one pass over the sequence); the fixed threshold of the paper is NLL = 6 (``threshold.mode: fixed``)."""

    name: ClassVar[str] = "ar-restoration"
    defaults: ClassVar[dict[str, Any]] = derive_defaults(**{"restoration.threshold": {"mode": "quantile", "quantile": 0.98,
                                                                                     "value": 6.0}})
    latent_modules: ClassVar[tuple[str, ...]] = ("ar",)
    #: the fixed threshold is a token NLL (>= 0)
    parameter_schema: ClassVar[dict[str, Any]] = derive_schema(latent_modules)
    #: restore with the key/value cache (same tokens as the naive loop; ``False``: the naive loop, for benchmarks)
    kv_cache: bool = True

    def _build_latent(self) -> dict[str, TokenTransformer]:
        return {"ar": self._transformer(int(self.params["tokenizer"]["num_embeddings"]), causal=True)}

    def _fit_latent(self, tokens: torch.Tensor, val_tokens: torch.Tensor | None, reused: set[str]) -> None:
        if "ar" not in reused:
            self.train_log += train_ar(self.nets["ar"], tokens, val_tokens, self.params["transformer_train"],
                                       **self._train_kw())

    def _token_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        return ar_token_nll(self.nets["ar"], tokens)

    def _restore(self, tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        rp = self.params["restoration"]
        return ar_restore(tokens, self.nets["ar"], self.threshold, int(rp["R"]), float(rp["temperature"]), seed,
                          self.logit_bias(tokens.device), kv_cache=self.kv_cache, progress=not self.quiet)
