"""Two honest baselines that prove the detector contract end to end.

- ``intensity``: the normalised image intensity is the anomaly score (bright FLAIR lesions are bright).
- ``autoencoder``: a small convolutional autoencoder (MONAI ``AutoEncoder``) trained on healthy images;
  the smoothed reconstruction residual is the anomaly map.
"""

from medanomaly.methods.baselines.autoencoder import AutoencoderDetector
from medanomaly.methods.baselines.intensity import IntensityDetector

__all__ = ["AutoencoderDetector", "IntensityDetector"]
