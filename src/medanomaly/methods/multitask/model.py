"""The network of the multi-task method: a U-Net (MONAI ``DynUNet``) fed with the image plus positional channels.

``DynUNet`` gives what the paper's U-Net needs: 2D or 3D, instance normalisation, downsampling by strided
convolutions, two convolutions per stage; the activation is GELU as in the original work. The network outputs
one logit per voxel; ``sigmoid(logit)`` is the anomaly score in [0, 1], trained against the soft synthetic labels.

Inputs of any size work: they are padded (edge values) to a multiple of the total stride and the output is
cropped back. For large 3D volumes :meth:`MultiTaskUNet.predict_scores` can run a sliding window; the positional
channels are then computed on the *whole* volume first so every window sees its true position.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet
from torch import nn

from medanomaly.nets.posenc import PositionalEncoding

__all__ = ["MultiTaskUNet"]


class MultiTaskUNet(nn.Module):
    """U-Net anomaly scorer. ``forward(x (B, C, *S)) -> logits (B, 1, *S)``.

    depth: number of resolution levels (depth 5 = 4 downsamplings); base_filters/max_filters: channels at the
    top level, doubled per level up to the maximum; posenc: keyword arguments of :class:`PositionalEncoding`
    (``{"coords": False, "n_fourier": 0}`` for none); init_score: the initial output score everywhere (the final
    bias is set to its logit; synthetic labels are mostly 0, so starting near 0 spares the first hundreds of steps).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, depth: int = 5, base_filters: int = 32,
                 max_filters: int = 320, posenc: dict[str, Any] | None = None, act: str = "gelu",
                 init_score: float = 0.02) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"MultiTaskUNet: spatial_dims must be 2 or 3, got {spatial_dims}")
        if depth < 3:
            raise ValueError(f"MultiTaskUNet: depth must be >= 3 (DynUNet needs at least two downsamplings), got {depth}")
        if in_channels < 1 or base_filters < 1:
            raise ValueError("MultiTaskUNet: in_channels and base_filters must be positive")
        self.spatial_dims, self.in_channels, self.depth = spatial_dims, in_channels, depth
        self.posenc = PositionalEncoding(spatial_dims, **(posenc or {}))
        filters = [min(base_filters * 2**i, max(max_filters, base_filters)) for i in range(depth)]
        self.net = DynUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels + self.posenc.num_channels,
            out_channels=1,
            kernel_size=[3] * depth,
            strides=[1] + [2] * (depth - 1),
            upsample_kernel_size=[2] * (depth - 1),
            filters=filters,
            norm_name=("instance", {"affine": True}),
            act_name=act,
            res_block=False,
        )
        self.multiple = 2 ** (depth - 1)
        if not 0.0 < init_score < 1.0:
            raise ValueError(f"MultiTaskUNet: init_score must be in (0, 1), got {init_score}")
        with torch.no_grad():
            self.net.output_block.conv.conv.bias.fill_(float(torch.logit(torch.tensor(init_score))))

    def add_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> network input (image channels followed by the positional channels)."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MultiTaskUNet: input must be (B, {self.in_channels}, *{self.spatial_dims} spatial dims), got {tuple(x.shape)}"
            )
        return self.posenc(x)

    def forward_with_positions(self, z: torch.Tensor) -> torch.Tensor:
        """Logits for an input that already carries its positional channels (pads to the stride, crops back)."""
        spatial = z.shape[2:]
        pad: list[int] = []
        for s in reversed(spatial):
            extra = (-s) % self.multiple
            pad += [extra // 2, extra - extra // 2]
        if any(pad):
            z = F.pad(z, pad, mode="replicate")
        out = self.net(z)
        if any(pad):
            lows = [pad[2 * (len(spatial) - 1 - d)] for d in range(len(spatial))]
            crop = tuple(slice(lo, lo + n) for lo, n in zip(lows, spatial, strict=True))
            out = out[(slice(None), slice(None), *crop)]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_positions(self.add_positions(x))

    def export_state(self) -> dict[str, torch.Tensor]:
        """State dict without DynUNet's aliases (``net.skip_layers.*`` share memory with other entries), for safetensors."""
        return {k: v for k, v in self.state_dict().items() if ".skip_layers." not in f".{k}"}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state written by :meth:`export_state`; any other missing or unexpected key is an error."""
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"MultiTaskUNet: weights do not match the configured network; was it trained with other "
                             f"model settings? ({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from e
        missing = [k for k in missing if ".skip_layers." not in f".{k}"]
        if missing or unexpected:
            raise ValueError(f"MultiTaskUNet: weights do not match the configured network (missing {missing[:3]}, "
                             f"unexpected {list(unexpected)[:3]}); was it trained with other model settings?")

    @torch.no_grad()
    def predict_scores(self, x: torch.Tensor, roi_size: tuple[int, ...] | None = None, sw_batch_size: int = 1,
                       overlap: float = 0.25, progress: bool = False) -> torch.Tensor:
        """Anomaly scores in [0, 1], (B, 1, *S). With ``roi_size``: MONAI sliding-window inference (low memory)."""
        z = self.add_positions(x)
        if roi_size is None or all(r >= s for r, s in zip(roi_size, x.shape[2:], strict=True)):
            return torch.sigmoid(self.forward_with_positions(z))
        from monai.inferers import sliding_window_inference

        roi = tuple(min(int(r), int(s)) for r, s in zip(roi_size, x.shape[2:], strict=True))
        logits = sliding_window_inference(z, roi, sw_batch_size, self.forward_with_positions, overlap=overlap,
                                          mode="gaussian", progress=progress)
        return torch.sigmoid(logits)
