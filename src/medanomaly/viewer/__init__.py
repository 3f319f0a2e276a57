"""``medanomaly view``: a local page that shows each scan with its anomaly map as a colour overlay, the calibrated
mask as an outline, a threshold slider, the connected components and the image score.

- :mod:`~medanomaly.viewer.records`: the ``view.json`` records ``predict`` and ``evaluate`` write, read back;
- :mod:`~medanomaly.viewer.server`: the stdlib HTTP server (127.0.0.1 only, random port, random token);
- ``static/``: the page, a self-contained canvas viewer (no network, no WebGL).
"""

from medanomaly.viewer.records import ViewerError, find_view

__all__ = ["ViewerError", "find_view"]
