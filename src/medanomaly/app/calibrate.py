"""The healthy calibration record of a run (``calibration.json``): its map and image scores on healthy images.

Written by ``train`` after ``fit`` from the validation split (healthy images only), or, without one, from the
healthy training images (recorded as such). One streaming pass through the one predict loop; only foreground
voxels count. ``predict --threshold`` and ``evaluate`` turn it into thresholds
(:mod:`medanomaly.evaluation.calibration`); no lesion label ever enters it.
"""

from __future__ import annotations

import time
from typing import Any

from medanomaly.app.predict import iter_predictions
from medanomaly.evaluation.calibration import CALIBRATION_VERSION, QuantileSketch

__all__ = ["healthy_calibration"]


def healthy_calibration(det: Any, dataset: Any, *, source: str, note: str | None = None, batch_size: int = 16,
                        k: int = 200_000) -> dict[str, Any]:
    """Predict ``dataset`` (healthy images) and summarise the foreground voxel scores and the image scores."""
    import torch

    from medanomaly.data.dataset import collate_samples

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples,
                                         num_workers=0)
    vox, img = QuantileSketch(k, seed=0), QuantileSketch(k, seed=1)
    t0 = time.perf_counter()
    for batch, res, _ in iter_predictions(det, loader):
        ps = res.pixel_scores.detach().float().cpu().numpy()
        fg = batch["foreground"][:, 0].numpy().astype(bool) if batch["foreground"].ndim == ps.ndim + 1 \
            else batch["foreground"].numpy().astype(bool)
        vox.update(ps[fg])
        img.update(res.image_scores.detach().float().cpu().numpy())
    if vox.n == 0:
        raise ValueError(f"calibration: no foreground voxel in the {source} images")
    return {"version": CALIBRATION_VERSION, "source": source, "note": note, "n_images": int(img.n),
            "rule": "a voxel/image is positive when its score is > the threshold",
            "voxel": vox.record(), "image": img.record(), "seconds": round(time.perf_counter() - t0, 3)}

