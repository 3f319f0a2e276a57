"""The network of the multi-task method: a U-Net (MONAI ``DynUNet``) fed with the image plus positional channels.

``DynUNet`` gives what the paper's U-Net needs: 2D or 3D, instance normalisation, downsampling by strided
convolutions, two convolutions per stage; the activation is GELU as in the original work. The network outputs
one logit per voxel; ``sigmoid(logit)`` is the anomaly score in [0, 1], trained against the soft synthetic labels.

Inputs of any size work: they are padded (edge values) to a multiple of the total stride and the output is
cropped back. For large 3D volumes :meth:`MultiTaskUNet.predict_scores` can run a sliding window; the positional
channels are then computed on the *whole* volume first so every window sees its true position.

Prediction of a whole volume is lean in memory and gives the same numbers as ``sigmoid(forward(x))``:
:meth:`MultiTaskUNet.network_input` writes the padded network input (image and positional channels) straight into
one tensor, slab by slab (no full-volume float64 temporaries, no cached full-volume encoding, no unpadded copy), and
:meth:`MultiTaskUNet.forward_padded` runs DynUNet's blocks in their order while dropping every tensor as soon as it
is consumed (the input after the first block, each encoder skip once its decoder level has used it). For BraTS
240x240x155 with the ``cpu-small`` network this took the peak RSS from 4.6 GB to 3.1 GB, bit-identical maps
(``docs/results/predict_3d_memory.md``); the peak is now the first convolution: its input (20 channels, 0.74 GB)
and the blocked-layout copy oneDNN makes of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetUpBlock
from monai.networks.nets import DynUNet
from torch import nn

from medanomaly.nets.posenc import PositionalEncoding, coordinate_grid

#: positional encodings up to this many elements (64 MB in float32) come from the module's per-shape cache (2D
#: images, training patches); larger ones (whole 3D volumes) are computed slab by slab and not kept
CACHE_ELEMENTS = 1 << 24
#: float64 bytes of one slab of the Fourier projection when the encoding is computed slab by slab
SLAB_BYTES = 32 << 20

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

    def stride_padding(self, spatial: tuple[int, ...] | torch.Size) -> list[int]:
        """``F.pad`` amounts (last axis first) that bring ``spatial`` to a multiple of the total stride, centred."""
        pad: list[int] = []
        for s in reversed(tuple(spatial)):
            extra = (-int(s)) % self.multiple
            pad += [extra // 2, extra - extra // 2]
        return pad

    def crop(self, out: torch.Tensor, spatial: tuple[int, ...] | torch.Size, pad: list[int]) -> torch.Tensor:
        """Undo :meth:`stride_padding` on a network output (a view)."""
        if not any(pad):
            return out
        lows = [pad[2 * (len(spatial) - 1 - d)] for d in range(len(spatial))]
        crop = tuple(slice(lo, lo + n) for lo, n in zip(lows, spatial, strict=True))
        return out[(slice(None), slice(None), *crop)]

    def forward_with_positions(self, z: torch.Tensor) -> torch.Tensor:
        """Logits for an input that already carries its positional channels (pads to the stride, crops back)."""
        spatial = z.shape[2:]
        pad = self.stride_padding(spatial)
        if any(pad):
            z = F.pad(z, pad, mode="replicate")
        return self.crop(self.net(z), spatial, pad)

    # ------------------------------------------------------------------ lean whole-volume prediction
    def input_key(self) -> tuple[Any, ...]:
        """Members with equal keys get the same :meth:`network_input` for the same images (an ensemble shares it)."""
        pe = self.posenc
        return (self.spatial_dims, self.in_channels, self.multiple, pe.coords, pe.n_fourier, pe.fourier_scale, pe.seed)

    @torch.no_grad()
    def network_input(self, x: torch.Tensor, padded: bool = True) -> torch.Tensor:
        """The network input for ``x``: ``F.pad(add_positions(x), stride_padding, "replicate")`` (``padded=False``:
        ``add_positions(x)``), the same numbers, built without its temporaries.

        One tensor is allocated and filled: the image channels replicate-padded, then the positional channels slab
        by slab along the first spatial axis, evaluated on the padded grid's *clamped* coordinates (which is what
        replicate padding of the encoding gives). Small encodings come from the module's per-shape cache; large ones
        are computed per slab exactly as :func:`medanomaly.nets.posenc.fourier_features` computes them per voxel
        (float64 projection, then float32) and are not cached.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MultiTaskUNet: input must be (B, {self.in_channels}, *{self.spatial_dims} spatial dims), got {tuple(x.shape)}"
            )
        spatial = tuple(int(s) for s in x.shape[2:])
        pad = self.stride_padding(spatial) if padded else [0] * (2 * len(spatial))
        lows = [pad[2 * (len(spatial) - 1 - d)] for d in range(len(spatial))]
        out_shape = [s + pad[2 * (len(spatial) - 1 - d)] + pad[2 * (len(spatial) - 1 - d) + 1] for d, s in enumerate(spatial)]
        pe = self.posenc
        c = self.in_channels
        z = torch.empty((x.shape[0], c + pe.num_channels, *out_shape), dtype=x.dtype, device=x.device)
        z[:, :c] = F.pad(x, pad, mode="replicate") if any(pad) else x
        if pe.num_channels == 0:
            return z
        # source index of every padded position along each axis (replicate padding = clamped index)
        index = [(torch.arange(n) - lo).clamp_(0, s - 1) for n, lo, s in zip(out_shape, lows, spatial, strict=True)]
        if pe.num_channels * int(np.prod(spatial)) <= CACHE_ELEMENTS:
            enc = pe.encoding(spatial, device=x.device, dtype=x.dtype)  # the cache entry forward() uses
            for d, idx in enumerate(index):
                if out_shape[d] != spatial[d]:
                    enc = enc.index_select(d + 1, idx.to(x.device))
            z[:, c:] = enc
            return z
        coords = [coordinate_grid((s,), dtype=torch.float32)[0][idx] for s, idx in zip(spatial, index, strict=True)]
        unit = [coordinate_grid((s,), 0.0, 1.0, endpoint=False, dtype=torch.float64)[0][idx]
                for s, idx in zip(spatial, index, strict=True)]
        freq = pe.frequencies.cpu()
        plane = int(np.prod(out_shape[1:]))
        rows = max(1, SLAB_BYTES // (8 * max(pe.n_fourier, len(spatial)) * plane))
        for r0 in range(0, out_shape[0], rows):
            r1 = min(r0 + rows, out_shape[0])
            parts = []
            if pe.coords:
                parts.append(torch.stack(torch.meshgrid(coords[0][r0:r1], *coords[1:], indexing="ij")))
            if pe.n_fourier:  # fourier_features' arithmetic, on this slab of coordinates
                p = torch.stack(torch.meshgrid(unit[0][r0:r1], *unit[1:], indexing="ij"))
                proj = torch.einsum("md,d...->m...", freq.to(torch.float64), p) * (2 * np.pi)
                del p
                parts.append(torch.cat([torch.sin(proj), torch.cos(proj)]).to(freq.dtype))
                del proj
            slab = torch.cat(parts) if len(parts) > 1 else parts[0]
            z[:, c:, r0:r1] = slab.to(device=x.device, dtype=x.dtype)
        return z

    def block_count(self) -> int:
        """Blocks :meth:`forward_padded` runs (its ``step`` is called after each)."""
        return 2 * len(self.net.upsamples) + 2

    def forward_padded(self, inputs: list[torch.Tensor], step: Callable[[], Any] | None = None) -> torch.Tensor:
        """Logits (B, 1, *padded) of ``inputs == [network_input(x)]``, the same numbers as ``self.net(z)``.

        The list is emptied: the input is freed as soon as the first block has consumed it (pass ``[z]`` and keep
        ``z`` elsewhere to keep it). Runs DynUNet's blocks in DynUNet's order, but drops each tensor as soon as it is
        consumed: every encoder skip after its decoder level, every block's input after its first convolution.
        ``step`` is called after each block (a progress bar). In training mode or with deep supervision: ``self.net``.
        """
        if len(inputs) != 1:
            raise ValueError(f"MultiTaskUNet.forward_padded: expected a list holding one input, got {len(inputs)}")
        net = self.net
        if net.training or net.deep_supervision:
            return net(inputs.pop())
        tick = step if step is not None else (lambda: None)
        downs = [net.input_block, *net.downsamples]
        ups = list(net.upsamples)[::-1]  # ups[i] merges level i's skip (DynUNet.skip_layers)
        skips: list[torch.Tensor] = [_run_block(downs[0], inputs)]
        tick()
        for blk in downs[1:]:
            skips.append(_run_block(blk, [skips[-1]]))
            tick()
        h = _run_block(net.bottleneck, [skips[-1]])
        tick()
        for i in reversed(range(len(downs))):
            up = ups[i]
            if isinstance(up, UnetUpBlock):  # UnetUpBlock.forward, without keeping its input and skip
                t = up.transp_conv(h)
                del h
                box = [torch.cat((t, skips.pop()), dim=1)]
                del t
                h = _run_block(up.conv_block, box)
            else:
                h = up(h, skips.pop())
            tick()
        out = net.output_block(h)
        tick()
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

    @staticmethod
    def whole_volume(roi_size: tuple[int, ...] | None, spatial: tuple[int, ...] | torch.Size) -> bool:
        """Whether :meth:`predict_scores` runs one forward of the whole input (no sliding window)."""
        return roi_size is None or all(int(r) >= int(s) for r, s in zip(roi_size, spatial, strict=True))

    @torch.no_grad()
    def predict_scores(self, x: torch.Tensor, roi_size: tuple[int, ...] | None = None, sw_batch_size: int = 1,
                       overlap: float = 0.25, progress: bool = False, inputs: list[torch.Tensor] | None = None,
                       step: Callable[[], Any] | None = None) -> torch.Tensor:
        """Anomaly scores in [0, 1], (B, 1, *S). With ``roi_size``: MONAI sliding-window inference (low memory).

        Whole input: ``sigmoid(forward(x))`` through :meth:`network_input` and :meth:`forward_padded` (same numbers,
        far less memory). ``inputs``: ``[network_input(x)]`` already built (an ensemble shares it between members
        with equal :meth:`input_key`); the list is emptied, so pass a copy of it to keep the tensor. ``step``: called
        after each network block. Sliding window: ``inputs`` and ``step`` are not used.
        """
        spatial = x.shape[2:]
        if self.whole_volume(roi_size, spatial):
            box = inputs if inputs is not None else [self.network_input(x)]
            return torch.sigmoid(self.crop(self.forward_padded(box, step), spatial, self.stride_padding(spatial)))
        from monai.inferers import sliding_window_inference

        z = self.network_input(x, padded=False)
        roi = tuple(min(int(r), int(s)) for r, s in zip(roi_size, spatial, strict=True))
        logits = sliding_window_inference(z, roi, sw_batch_size, self.forward_with_positions, overlap=overlap,
                                          mode="gaussian", progress=progress)
        return torch.sigmoid(logits)


def _run_block(block: nn.Module, box: list[torch.Tensor]) -> torch.Tensor:
    """``block(box.pop())``; a :class:`UnetBasicBlock` is run step by step so that its input is dropped after its
    first convolution (when nothing else holds it). Same operations in the same order as ``UnetBasicBlock.forward``."""
    if not isinstance(block, UnetBasicBlock):
        return block(box.pop())
    out = block.conv1(box.pop())
    out = block.norm1(out)
    out = block.lrelu(out)
    out = block.conv2(out)
    out = block.norm2(out)
    return block.lrelu(out)
