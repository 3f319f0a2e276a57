"""Domain-shift augmentation of a healthy image with its foreground: what another scanner or site may change.

:class:`DomainShift` maps ``(image (C, *S), foreground (*S) bool, rng)`` to a new ``(image, foreground)`` with 2 or 3
spatial dims. It is a pure function of its inputs: every random choice comes from the ``numpy.random.Generator``
passed in (MONAI's random transforms are re-seeded from it on every call), so a training stream that derives the
generator from ``(seed, member, step, slot)`` stays deterministic, with or without DataLoader workers.

Parts, in this order, each applied independently with probability ``p``:

1. ``rotate_deg`` / ``scale``: a small rotation (about every axis in 3D, uniform in +-``rotate_deg`` degrees) and
   an isotropic zoom (uniform in ``scale``; > 1 enlarges the anatomy) about the image centre, by MONAI's ``Affine``:
   bilinear for the image, nearest for the foreground, zeros outside the field of view. An image whose background
   was exactly 0 (the presets' ``zero_background``) keeps it exactly 0 outside the transformed foreground. A draw
   that would lose more than half the foreground (a brain near the border) is not applied. MONAI's ``RandAffine``
   is not used because it zooms each axis independently (an anisotropic scale); ``Affine`` with drawn parameters
   gives one zoom factor.
2. ``low_res``: resolution loss, down-sampling by a factor uniform in ``low_res`` (area averaging, as a coarser
   acquisition averages) and up-sampling back (bi/trilinear): MONAI's ``RandSimulateLowResolution``.
3. ``bias_field``: a smooth multiplicative field ``exp(sum c_k P_k)`` of Legendre polynomials of degree 3 with
   coefficients uniform in +-``bias_field`` (MONAI's ``RandBiasField``; TorchIO's ``RandomBiasField`` uses the same
   model with 0.5).
4. ``gamma``: contrast change ``x -> lo + (hi - lo) ((x - lo) / (hi - lo))**gamma``, gamma uniform in ``gamma``
   (MONAI's ``RandAdjustContrast``).
5. ``scale_intensity``: intensities times a factor uniform in ``scale_intensity`` (MONAI's ``RandScaleIntensity``).

The intensity parts (2-5) change the foreground only: background voxels keep their value. Finally the image is
clipped to ``value_range`` (the intensity range the preset produces, ``[0, 1]`` for the brain presets; by default
the input image's own ``[min, max]``). The output is float32 and contiguous, with the input's shape; the foreground
is bool ``(*S)``. Nothing is modified in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["DomainShift", "AUGMENT_DEFAULTS", "PARTS"]

#: the settings of :class:`DomainShift` and their defaults (``enabled`` is for the method's config block)
AUGMENT_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "p": 0.5,  # probability of each part, independently
    "rotate_deg": 10.0,  # max |angle| about each axis, degrees (0: off)
    "scale": [0.9, 1.1],  # isotropic zoom range ([1, 1]: off)
    "low_res": [1.0, 2.0],  # down-sampling factor range ([1, 1]: off)
    "bias_field": 0.3,  # max |coefficient| of the log bias field (0: off)
    "gamma": [0.7, 1.5],  # contrast gamma range ([1, 1]: off)
    "scale_intensity": [0.8, 1.2],  # intensity factor range ([1, 1]: off)
}
PARTS = ("geometry", "low_res", "bias_field", "gamma", "scale_intensity")


def _pair(name: str, value: Any, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"augment.{name} = {value!r}: expected two numbers [low, high]") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"augment.{name} = {value!r}: expected finite numbers")
    if a > b:
        raise ValueError(f"augment.{name} = {value!r}: the low end exceeds the high end")
    if a < lo or b > hi:
        raise ValueError(f"augment.{name} = {value!r}: expected values in [{lo}, {hi}]")
    return a, b


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise ValueError(f"augment.{name} = {value!r}: expected a number in [{lo}, {hi}]")
    if not lo <= float(value) <= hi:
        raise ValueError(f"augment.{name} = {value!r}: expected a number in [{lo}, {hi}]")
    return float(value)


@dataclass
class DomainShift:
    """A random domain shift of a healthy image and its foreground (see the module docstring).

    Bad settings raise ``ValueError`` naming the setting (``augment.gamma = [1.5, 0.7]: the low end exceeds ...``).
    """

    p: float = AUGMENT_DEFAULTS["p"]
    rotate_deg: float = AUGMENT_DEFAULTS["rotate_deg"]
    scale: Sequence[float] = tuple(AUGMENT_DEFAULTS["scale"])
    low_res: Sequence[float] = tuple(AUGMENT_DEFAULTS["low_res"])
    bias_field: float = AUGMENT_DEFAULTS["bias_field"]
    gamma: Sequence[float] = tuple(AUGMENT_DEFAULTS["gamma"])
    scale_intensity: Sequence[float] = tuple(AUGMENT_DEFAULTS["scale_intensity"])
    #: clip range of the output; None: the input image's own [min, max]
    value_range: Sequence[float] | None = None
    _cache: dict[int, dict[str, Any]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.p = _number("p", self.p, 0.0, 1.0)
        self.rotate_deg = _number("rotate_deg", self.rotate_deg, 0.0, 180.0)
        self.scale = _pair("scale", self.scale, 0.25, 4.0)
        self.low_res = _pair("low_res", self.low_res, 1.0, 16.0)
        self.bias_field = _number("bias_field", self.bias_field, 0.0, 2.0)
        self.gamma = _pair("gamma", self.gamma, 0.05, 20.0)
        self.scale_intensity = _pair("scale_intensity", self.scale_intensity, 0.05, 20.0)
        if self.value_range is not None:
            self.value_range = _pair("value_range", self.value_range, -math.inf, math.inf)

    @classmethod
    def from_params(cls, params: dict[str, Any], value_range: Sequence[float] | None = None) -> DomainShift:
        """From a config block like :data:`AUGMENT_DEFAULTS` (``enabled`` is ignored here); unknown keys raise."""
        extra = set(params) - set(AUGMENT_DEFAULTS)
        if extra:
            raise ValueError(f"augment: unknown setting(s) {sorted(extra)}; known: {sorted(AUGMENT_DEFAULTS)}")
        kw = {k: v for k, v in params.items() if k != "enabled"}
        return cls(**kw, value_range=value_range)

    def active_parts(self) -> list[str]:
        """The parts whose settings change anything."""
        on = {
            "geometry": self.rotate_deg > 0 or tuple(self.scale) != (1.0, 1.0),
            "low_res": self.low_res[1] > 1.0,
            "bias_field": self.bias_field > 0,
            "gamma": tuple(self.gamma) != (1.0, 1.0),
            "scale_intensity": tuple(self.scale_intensity) != (1.0, 1.0),
        }
        return [k for k in PARTS if on[k] and self.p > 0]

    def __getstate__(self) -> dict[str, Any]:  # the MONAI transforms are rebuilt in each worker
        return {**self.__dict__, "_cache": {}}

    def _transforms(self, dims: int) -> dict[str, Any]:
        if dims not in self._cache:
            from monai.transforms import RandAdjustContrast, RandBiasField, RandScaleIntensity, RandSimulateLowResolution

            lo, hi = self.low_res
            self._cache[dims] = {
                "low_res": RandSimulateLowResolution(prob=1.0, downsample_mode="area",
                                                     upsample_mode="bilinear" if dims == 2 else "trilinear",
                                                     zoom_range=(1.0 / hi, 1.0 / lo)),
                "bias_field": RandBiasField(degree=3, coeff_range=(-self.bias_field, self.bias_field), prob=1.0),
                "gamma": RandAdjustContrast(prob=1.0, gamma=tuple(self.gamma)),
                "scale_intensity": RandScaleIntensity(factors=(self.scale_intensity[0] - 1.0, self.scale_intensity[1] - 1.0),
                                                      prob=1.0),
            }
        return self._cache[dims]

    def __call__(self, image: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(shifted image (C, *S) float32, its foreground (*S) bool); inputs are not modified."""
        image = np.asarray(image)
        fg = np.asarray(foreground).astype(bool).reshape(image.shape[1:])
        dims = image.ndim - 1
        if dims not in (2, 3):
            raise ValueError(f"augment: expected an image (C, H, W) or (C, D, H, W), got shape {image.shape}")
        # a fixed number of draws, whatever is applied: what one part draws does not depend on the others
        apply = rng.random(len(PARTS)) < self.p
        seeds = rng.integers(0, 2**32, size=len(PARTS))
        angles = rng.uniform(-1.0, 1.0, size=1 if dims == 2 else 3) * math.radians(self.rotate_deg)
        zoom = float(rng.uniform(*self.scale))
        active = set(self.active_parts())
        todo = [k for k, a in zip(PARTS, apply, strict=True) if a and k in active]
        lo, hi = self.value_range if self.value_range is not None else (float(image.min()), float(image.max()))
        if not todo:
            return np.ascontiguousarray(image, dtype=np.float32), fg
        x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))
        zero_bg = not bool(image[:, ~fg].any())
        if "geometry" in todo:
            x, fg = _affine(x, fg, angles, zoom, zero_bg)
        fg_t = torch.from_numpy(fg)
        ts = self._transforms(dims)
        for i, name in enumerate(PARTS):
            if name == "geometry" or name not in todo:
                continue
            t = ts[name]
            t.set_random_state(seed=int(seeds[i]))
            y = torch.as_tensor(t(x)).float()
            x = torch.where(fg_t, y, x)  # the foreground only
        out = np.clip(x.numpy(), lo, hi).astype(np.float32, copy=False)
        return np.ascontiguousarray(out), fg


def _affine(x: torch.Tensor, fg: np.ndarray, angles: np.ndarray, zoom: float, zero_bg: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Rotate/zoom image and foreground together (MONAI ``Affine``); the draw is skipped when it loses half the
    foreground."""
    from monai.transforms import Affine

    dims = x.ndim - 1
    aff = Affine(rotate_params=[float(a) for a in angles] if dims == 3 else float(angles[0]),
                 scale_params=[1.0 / zoom] * dims, padding_mode="zeros", image_only=True)  # MONAI scales the grid
    y = torch.as_tensor(aff(x, mode="bilinear")).float()
    f = torch.as_tensor(aff(torch.from_numpy(fg[None].astype(np.float32)), mode="nearest"))[0].numpy() > 0.5
    if f.sum() * 2 < fg.sum():
        return x, fg
    if zero_bg:
        y = y * torch.from_numpy(f)
    return y, f
