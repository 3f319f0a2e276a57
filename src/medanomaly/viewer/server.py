"""The local viewer server: a stdlib ``ThreadingHTTPServer`` bound to 127.0.0.1 on a free port, every path behind
a random token (``http://127.0.0.1:PORT/TOKEN/``); any other path or token gets 403.

Endpoints (all ``GET``, under ``/TOKEN``):

- ``/`` the page; ``/static/<file>`` its script and style (package data, no network);
- ``/api/cases`` JSON: every case with its colour scale, thresholds, image score, slice count and geometry;
- ``/api/slice?case=I&k=K`` JSON: display slice ``K`` of case ``I`` (grey as base64 uint8, map as base64 float32,
  foreground and lesion as base64 uint8), in the overlays' orientation (radiological axial for volumes);
- ``/api/components?case=I&t=T`` JSON: the connected components of ``map > T`` inside the foreground, whole case;
- ``/api/overlay.png?case=I&k=K&t=T`` the slice drawn server-side (map colours, mask outline at ``T``);
- ``/api/volume/I/image.nii.gz``, ``/api/volume/I/map.nii.gz`` a volume case's image and map (map: its minimum outside
  the foreground) as gzipped NIfTI with the case's affine, for the page's NiiVue panel (``static/niivue.umd.js``,
  the unmodified NiiVue bundle, BSD-2-Clause, ``static/NIIVUE_LICENSE.txt``).
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import mimetypes
import secrets
import threading
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from medanomaly.viewer.records import CaseData, ViewerError, find_view, load_case

__all__ = ["ViewerApp", "make_server", "serve"]

HOST = "127.0.0.1"
MAX_SENT = 1600  # pixels along the longer side of a slice sent to the page (components use every voxel)
_STATIC = ("index.html", "viewer.js", "viewer.css", "niivue.umd.js", "NIIVUE_LICENSE.txt")


class ViewerApp:
    """The cases of one folder, loaded lazily (the last few kept in memory), as the JSON/PNG the page asks for."""

    def __init__(self, folder: str | Path, cache: int = 3) -> None:
        self.folder = Path(folder)
        self.base, self.cases = find_view(self.folder)
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._nii: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._size = cache
        self._lock = threading.Lock()

    # -- loading
    def _prepared(self, i: int) -> dict[str, Any]:
        from medanomaly.evaluation.overlays import grey_range, image_scale, slice_view

        if not 0 <= i < len(self.cases):
            raise KeyError(f"no case {i}")
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        data: CaseData = load_case(self.base, self.cases[i])
        view = slice_view(data.image.shape, data.affine)
        scale = self.cases[i].get("scale") or image_scale(data.amap, data.foreground).to_json()
        prep = {"data": data, "view": view, "grey": grey_range(data.image), "scale": scale}
        with self._lock:
            self._cache[i] = prep
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return prep

    def case_info(self, i: int) -> dict[str, Any]:
        c = self.cases[i]
        info = {k: c.get(k) for k in ("id", "title", "image_score", "threshold", "threshold_rule", "image_threshold",
                                      "image_rule", "method", "input")}
        try:
            p = self._prepared(i)
        except (ViewerError, ValueError, OSError) as e:
            return {**info, "index": i, "error": str(e)}
        d, v = p["data"], p["view"]
        from medanomaly.evaluation.overlays import MapScale

        sc = p["scale"]
        ms = MapScale(sc["kind"], np.array(sc["xp"]), np.array(sc["yp"]), sc["lo_level"], sc["hi_level"], [], "")
        masses = []
        for k in range(v.n):  # the slice with the most anomaly opens first
            t = ms.position(v.get(d.amap, k))
            if d.foreground is not None:
                t = np.where(v.get(d.foreground, k), t, np.nan)
            masses.append(float(np.nansum(t + 0.05 * np.isfinite(t))))
        full = v.get(d.image, 0)
        step = -(-max(full.shape) // MAX_SENT)
        first = full[::step, ::step]  # the size the slices are sent at
        return {**info, "index": i, "n_slices": v.n, "width": int(first.shape[1]), "height": int(first.shape[0]),
                "aspect": v.aspect, "labels": v.labels, "positions": v.positions, "orientation_note": v.note,
                "start_slice": int(np.argmax(masses)), "scale": sc, "has_lesion": d.lesion is not None,
                "has_foreground": d.foreground is not None, "volume": d.affine is not None and d.image.ndim == 3}

    def cases_json(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "cases": [self.case_info(i) for i in range(len(self.cases))]}

    def _slice_arrays(self, i: int, k: int) -> dict[str, np.ndarray | None]:
        p = self._prepared(i)
        d, v = p["data"], p["view"]
        if not 0 <= k < v.n:
            raise KeyError(f"case {i} has no slice {k}")
        lo, hi = p["grey"]
        first = v.get(d.image, k)
        step = max(1, -(-max(first.shape) // MAX_SENT))  # a huge radiograph is sent every step-th pixel

        def sl(a: np.ndarray) -> np.ndarray:
            return v.get(a, k)[::step, ::step]

        grey = np.clip((sl(d.image) - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
        return {"grey": grey, "map": np.asarray(sl(d.amap), np.float32),
                "foreground": None if d.foreground is None else np.asarray(sl(d.foreground), np.uint8),
                "lesion": None if d.lesion is None else np.asarray(sl(d.lesion), np.uint8)}

    def slice_json(self, i: int, k: int) -> dict[str, Any]:
        a = self._slice_arrays(i, k)

        def b64(x: np.ndarray | None, dtype: Any) -> str | None:
            return None if x is None else base64.b64encode(np.ascontiguousarray(x, dtype=dtype).tobytes()).decode("ascii")

        h, w = a["grey"].shape
        return {"case": i, "k": k, "width": w, "height": h, "grey": b64(a["grey"], np.uint8),
                "map": b64(a["map"], "<f4"), "foreground": b64(a["foreground"], np.uint8),
                "lesion": b64(a["lesion"], np.uint8)}

    def components_json(self, i: int, t: float) -> dict[str, Any]:
        from medanomaly.evaluation.calibration import components_table

        d = self._prepared(i)["data"]
        mask = d.amap > t
        if d.foreground is not None:
            mask &= d.foreground
        aff = d.affine if d.affine is not None else np.eye(4)
        rows = components_table(mask, d.amap, aff)
        rows.sort(key=lambda r: -r["voxels"])
        return {"case": i, "threshold": t, "n_components": len(rows), "voxels": int(mask.sum()), "rows": rows[:50],
                "mm": d.affine is not None, "ndim": int(mask.ndim)}

    def volume_nii(self, i: int, what: str) -> bytes:
        """Gzipped NIfTI of a volume case's ``image`` or ``map`` (the map at its minimum outside the foreground)."""
        import gzip

        import nibabel as nib

        if what not in ("image", "map"):
            raise KeyError(f"no volume {what!r}")
        with self._lock:
            if (i, what) in self._nii:
                return self._nii[(i, what)]
        d = self._prepared(i)["data"]
        if d.affine is None or d.image.ndim != 3:
            raise KeyError(f"case {i} is not a volume with a patient geometry")
        arr = d.image if what == "image" else d.amap
        if what == "map" and d.foreground is not None:
            arr = np.where(d.foreground, d.amap, float(d.amap.min()))
        img = nib.Nifti1Image(np.asarray(arr, np.float32), d.affine)
        img.header.set_xyzt_units("mm")
        body = gzip.compress(img.to_bytes(), compresslevel=1)
        with self._lock:
            self._nii[(i, what)] = body
            while len(self._nii) > 4:
                self._nii.popitem(last=False)
        return body

    def overlay_png(self, i: int, k: int, t: float | None) -> bytes:
        from PIL import Image

        from medanomaly.evaluation.overlays import MapScale, composite

        a = self._slice_arrays(i, k)
        sc = self._prepared(i)["scale"]
        ms = MapScale(sc["kind"], np.array(sc["xp"]), np.array(sc["yp"]), sc["lo_level"], sc["hi_level"], [], "")
        fg = None if a["foreground"] is None else a["foreground"] > 0
        rgb = composite(a["grey"] / 255.0, a["map"], ms, fg)
        if t is not None:
            mask = a["map"] > t
            if fg is not None:
                mask &= fg
            edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
            rgb[edge] = (0.0, 0.9, 1.0)
        buf = io.BytesIO()
        Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: _ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        from medanomaly.evaluation import json_safe

        self._send(status, json.dumps(json_safe(obj)).encode(), "application/json")

    def _forbidden(self) -> None:
        self._send(HTTPStatus.FORBIDDEN, b"forbidden\n", "text/plain")

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self._forbidden()

    do_PUT = do_DELETE = do_POST  # noqa: N815

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        url = urlsplit(self.path)
        parts = url.path.split("/")
        token = self.server.token
        if len(parts) < 2 or not hmac.compare_digest(parts[1].encode(), token.encode()):
            return self._forbidden()
        rest = "/".join(parts[2:])
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        app = self.server.app
        try:
            if rest in ("", "index.html"):
                return self._static("index.html")
            if rest.startswith("static/") and rest[7:] in _STATIC:
                return self._static(rest[7:])
            if rest == "api/cases":
                return self._json(app.cases_json())
            if rest == "api/slice":
                return self._json(app.slice_json(int(q["case"]), int(q["k"])))
            if rest == "api/components":
                return self._json(app.components_json(int(q["case"]), float(q["t"])))
            if rest.startswith("api/volume/"):
                _, _, idx, name = rest.split("/", 3)
                if name not in ("image.nii.gz", "map.nii.gz"):
                    raise KeyError(f"no volume file {name!r}")
                return self._send(200, app.volume_nii(int(idx), name.split(".")[0]), "application/gzip")
            if rest == "api/overlay.png":
                t = float(q["t"]) if q.get("t") not in (None, "") else None
                return self._send(200, app.overlay_png(int(q["case"]), int(q.get("k", 0)), t), "image/png")
        except (KeyError, ValueError, IndexError) as e:
            return self._json({"error": str(e.args[0] if isinstance(e, KeyError) and e.args else e)}, 400)
        return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _static(self, name: str) -> None:
        body = resources.files("medanomaly.viewer").joinpath("static", name).read_bytes()
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self._send(200, body, ctype + ("; charset=utf-8" if ctype.startswith("text/") or name.endswith(".js") else ""))


class _ViewerServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, app: ViewerApp, port: int, token: str, verbose: bool) -> None:
        self.app, self.token, self.verbose = app, token, verbose
        super().__init__((HOST, port), _Handler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/{self.token}/"


def make_server(folder: str | Path, port: int = 0, token: str | None = None, verbose: bool = False) -> _ViewerServer:
    """A server for ``folder`` on 127.0.0.1 (``port`` 0: a free one), not yet serving; its ``url`` holds the token.
    A folder with nothing to show or a port in use is a :class:`ViewerError`."""
    app = ViewerApp(folder)
    try:
        return _ViewerServer(app, int(port), token or secrets.token_urlsafe(18), verbose)
    except OSError as e:
        if port and getattr(e, "errno", None) in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise ViewerError(f"port {port} is in use on {HOST}; choose another --port, or leave it out for a free one") from None
        raise ViewerError(f"cannot listen on {HOST}:{port} ({e.strerror or e})") from None


def serve(folder: str | Path, port: int = 0, open_browser: bool = False, case: str | None = None,
          echo: Any = print) -> None:
    """Serve ``folder`` until interrupted; prints the URL (with ``?case=`` when ``case`` is given)."""
    srv = make_server(folder, port)
    url = srv.url
    if case is not None:
        ids = [str(c.get("id")) for c in srv.app.cases]
        if case not in ids:
            srv.server_close()
            raise ViewerError(f"no case {case!r} in {folder}; cases: {', '.join(ids[:10])}" + (" ..." if len(ids) > 10 else ""))
        url += f"?case={ids.index(case)}"
    echo(f"viewer: {url}")
    echo(f"serving {len(srv.app.cases)} case(s) from {folder} on {HOST} only; Ctrl-C to stop")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
