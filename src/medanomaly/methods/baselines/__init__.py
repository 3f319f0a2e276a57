"""Two honest baselines that prove the detector contract end to end.

- ``intensity``: the normalised image intensity is the anomaly score (bright FLAIR lesions are bright).
- ``autoencoder``: a small convolutional autoencoder (MONAI ``AutoEncoder``) trained on healthy images;
  the smoothed reconstruction residual is the anomaly map.
"""

from medanomaly.methods.discovery import lazy_exports

#: the methods this package registers, and the module whose import registers each (see methods/discovery.py)
METHODS = {"intensity": "medanomaly.methods.baselines.intensity", "autoencoder": "medanomaly.methods.baselines.autoencoder"}

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "AutoencoderDetector": "medanomaly.methods.baselines.autoencoder",
    "IntensityDetector": "medanomaly.methods.baselines.intensity",
})
