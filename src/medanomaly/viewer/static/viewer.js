// medanomaly viewer: draws one slice at a time on a canvas from the local server's raw arrays; volumes with a
// patient geometry also get a NiiVue multiplanar panel (static/niivue.umd.js, vendored).
// Colours: the same scale and colour table as the PNG overlays (medanomaly.evaluation.overlays).
// URL parameters: case=<index>, k=<slice>, t=<threshold level on the colour scale>, map=0 (hide the map).
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const ALPHA = 0.6;
const LUT = (() => {  // colour_lut(): a cut of "hot", dark red -> yellow -> pale yellow
  const out = [];
  for (let i = 0; i < 256; i++) {
    const u = 0.36 + (0.92 - 0.36) * i / 255;
    const c = (v) => Math.round(Math.min(1, Math.max(0, v)) * 255);
    out.push([c(3 * u), c(3 * u - 1), c(3 * u - 2)]);
  }
  return out;
})();
const MASK_RGB = [0, 229, 255], LESION_RGB = [57, 255, 20];

const state = { cases: [], ci: -1, k: 0, level: null, slice: null, compTimer: null, seq: 0, nv: null, nvCase: -1 };

function interp(x, xp, yp) {  // numpy.interp
  const n = xp.length;
  if (x <= xp[0]) return yp[0];
  if (x >= xp[n - 1]) return yp[n - 1];
  let lo = 0, hi = n - 1;
  while (hi - lo > 1) { const m = (lo + hi) >> 1; if (xp[m] <= x) lo = m; else hi = m; }
  const f = xp[hi] === xp[lo] ? 0 : (x - xp[lo]) / (xp[hi] - xp[lo]);
  return yp[lo] + f * (yp[hi] - yp[lo]);
}
const scoreAt = (sc, level) => interp(level, sc.yp, sc.xp);
const levelOf = (sc, score) => interp(score, sc.xp, sc.yp);

function b64(s, Type) {
  if (!s) return null;
  const bin = atob(s), buf = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) buf[i] = bin.charCodeAt(i);
  return new Type(buf.buffer);
}

function fmt(x, d = 3) { return x === null || x === undefined ? "–" : Number(x).toPrecision(d); }
function pct(level) { const p = 100 * Math.pow(10, -level); return (p >= 1 ? p.toFixed(p >= 10 ? 0 : 1) : p.toPrecision(2)) + " %"; }

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  const j = await r.json();
  if (!r.ok || j.error) throw new Error(j.error || r.statusText);
  return j;
}

function showError(msg) { const e = $("error"); e.hidden = !msg; e.textContent = msg || ""; }

function currentThreshold() {
  const c = state.cases[state.ci];
  return state.level === null ? null : scoreAt(c.scale, state.level);
}

function draw() {
  const c = state.cases[state.ci], s = state.slice;
  if (!c || !s) return;
  const w = s.width, h = s.height, sc = c.scale;
  const cv = $("slice"), off = document.createElement("canvas");
  off.width = w; off.height = h;
  const octx = off.getContext("2d"), img = octx.createImageData(w, h), px = img.data;
  const thr = currentThreshold(), showMap = $("show-map").checked;
  const mask = new Uint8Array(w * h);
  let nOverlay = 0, nMask = 0;
  for (let i = 0; i < w * h; i++) {
    const g = s.grey[i], v = s.map[i], inside = !s.fg || s.fg[i] > 0;
    let r = g, gg = g, b = g;
    if (showMap && inside) {
      const lev = levelOf(sc, v);
      if (lev >= sc.lo_level) {
        const t = Math.min(1, (lev - sc.lo_level) / (sc.hi_level - sc.lo_level));
        const col = LUT[Math.min(255, Math.floor(t * 255))];
        r = g * (1 - ALPHA) + col[0] * ALPHA; gg = g * (1 - ALPHA) + col[1] * ALPHA; b = g * (1 - ALPHA) + col[2] * ALPHA;
        nOverlay++;
      }
    }
    if (thr !== null && inside && v > thr) { mask[i] = 1; nMask++; }
    px[4 * i] = r; px[4 * i + 1] = gg; px[4 * i + 2] = b; px[4 * i + 3] = 255;
  }
  octx.putImageData(img, 0, 0);
  // the slice enlarged without smoothing, outlines drawn on top as lines along the pixel borders
  const zoom = Math.max(1, Math.min(640 / w, 640 / (h * c.aspect)));
  const W = Math.round(w * zoom), H = Math.round(h * zoom * c.aspect), sx = W / w, sy = H / h;
  cv.width = W; cv.height = H;
  const ctx = cv.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, 0, 0, W, H);
  const outline = (m, rgb) => {
    ctx.beginPath();
    const inM = (x, y) => x >= 0 && y >= 0 && x < w && y < h && m[y * w + x] > 0;
    for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
      if (!m[y * w + x]) continue;
      const X0 = Math.round(x * sx), X1 = Math.round((x + 1) * sx), Y0 = Math.round(y * sy), Y1 = Math.round((y + 1) * sy);
      if (!inM(x, y - 1)) { ctx.moveTo(X0, Y0); ctx.lineTo(X1, Y0); }
      if (!inM(x, y + 1)) { ctx.moveTo(X0, Y1); ctx.lineTo(X1, Y1); }
      if (!inM(x - 1, y)) { ctx.moveTo(X0, Y0); ctx.lineTo(X0, Y1); }
      if (!inM(x + 1, y)) { ctx.moveTo(X1, Y0); ctx.lineTo(X1, Y1); }
    }
    ctx.strokeStyle = `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;
    ctx.lineWidth = 2;
    ctx.lineCap = "square";
    ctx.stroke();
  };
  if (s.lesion) outline(s.lesion, LESION_RGB);
  outline(mask, MASK_RGB);
  cv.style.width = `${W}px`;
  cv.style.height = `${H}px`;
  $("cbar").style.height = cv.style.height;
  cv.dataset.overlayPixels = nOverlay;
  cv.dataset.maskPixels = nMask;
  cv.dataset.threshold = thr === null ? "" : thr;
  const pos = c.positions ? `z = ${c.positions[state.k].toFixed(1)} mm, ` : "";
  $("slice-out").textContent = c.n_slices > 1 ? `${pos}slice ${state.k} of ${c.n_slices}` : "";
  drawColourbar();
  document.body.dataset.ready = "1";
}

function drawColourbar() {
  const c = state.cases[state.ci], sc = c.scale, cv = $("cbar"), ctx = cv.getContext("2d");
  for (let y = 0; y < 256; y++) { const col = LUT[255 - y]; ctx.fillStyle = `rgb(${col[0]},${col[1]},${col[2]})`; ctx.fillRect(0, y, 18, 1); }
  const ticks = $("cbar-ticks");
  ticks.innerHTML = "";
  const at = (lev) => 100 * (1 - (lev - sc.lo_level) / (sc.hi_level - sc.lo_level));
  for (const [lev, label] of sc.ticks || []) {
    const d = document.createElement("div");
    d.style.top = `${at(lev)}%`; d.textContent = label; ticks.appendChild(d);
  }
  if (state.level !== null && state.level >= sc.lo_level && state.level <= sc.hi_level) {
    const d = document.createElement("div");
    d.className = "thr"; d.style.top = `${at(state.level)}%`; d.textContent = "◀ mask"; d.style.left = "70px";
    ticks.appendChild(d);
  }
  $("cbar-label").textContent = (sc.label || "").replace("\n", " · ") + (sc.note ? ` — ${sc.note}` : "");
}

function thresholdText() {
  const c = state.cases[state.ci], sc = c.scale, t = currentThreshold();
  if (t === null) return "none";
  const healthy = sc.kind === "healthy" ? `, ${pct(state.level)} of healthy voxels above` : "";
  return `score > ${fmt(t, 4)}${healthy}`;
}

function updateScores() {
  const c = state.cases[state.ci];
  let html = `image score <b>${fmt(c.image_score, 4)}</b>`;
  if (c.image_threshold !== null && c.image_threshold !== undefined && c.image_score !== null) {
    const ab = c.image_score > c.image_threshold;
    html += ` — <span class="${ab ? "abnormal" : ""}">${ab ? "ABNORMAL" : "normal"}</span> at the calibrated image threshold ${fmt(c.image_threshold, 4)}`;
    if (c.image_rule) html += ` (${c.image_rule.split(" (")[0]})`;
  }
  if (c.threshold !== null && c.threshold !== undefined) {
    html += `<br>calibrated voxel threshold ${fmt(c.threshold, 4)}` + (c.threshold_rule ? ` (${c.threshold_rule.split(" (")[0]})` : "");
  }
  if (c.method) html += `<br>method: ${c.method}`;
  $("scores").innerHTML = html;
}

function scheduleComponents() {
  clearTimeout(state.compTimer);
  state.compTimer = setTimeout(loadComponents, 200);
}

async function loadComponents() {
  const t = currentThreshold(), ci = state.ci;
  if (t === null) { $("components").textContent = "no threshold"; return; }
  try {
    const j = await getJSON(`api/components?case=${ci}&t=${t}`);
    if (ci !== state.ci) return;
    const unit = j.mm ? "x, y, z mm" : (j.ndim === 2 ? "row, column" : "voxel index");
    let html = `${j.n_components} component(s), ${j.voxels} voxel(s) above ${fmt(t, 4)}`;
    if (j.rows.length) {
      html += `<table><tr><th>#</th><th>voxels</th>${j.mm ? "<th>volume mL</th>" : ""}<th>peak</th><th>mean</th><th>centroid (${unit})</th></tr>`;
      for (const r of j.rows.slice(0, 20)) {
        html += `<tr><td>${r.component}</td><td>${r.voxels}</td>${j.mm ? `<td>${fmt(r.volume_ml)}</td>` : ""}<td>${fmt(r.peak_score)}</td>` +
          `<td>${fmt(r.mean_score)}</td><td>${[r.centroid_x_mm, r.centroid_y_mm, r.centroid_z_mm].slice(0, j.mm ? 3 : j.ndim).map((v) => v.toFixed(1)).join(", ")}</td></tr>`;
      }
      html += "</table>";
      if (j.n_components > 20) html += `<span class="note">largest 20 of ${j.n_components}</span>`;
    }
    $("components").innerHTML = html;
  } catch (e) { $("components").textContent = `components: ${e.message}`; }
}

async function loadSlice() {
  const ci = state.ci, k = state.k, seq = ++state.seq;
  try {
    const j = await getJSON(`api/slice?case=${ci}&k=${k}`);
    if (seq !== state.seq) return;  // a newer request is under way
    state.slice = { width: j.width, height: j.height, grey: b64(j.grey, Uint8Array), map: b64(j.map, Float32Array),
      fg: b64(j.foreground, Uint8Array), lesion: b64(j.lesion, Uint8Array) };
    showError("");
    draw();
    nvSync();
  } catch (e) { showError(`slice: ${e.message}`); }
}

// ---- NiiVue panel (volumes with a patient geometry): image + map above the mask threshold, multiplanar
async function nvShow(ci) {
  const c = state.cases[ci], sec = $("nv-section"), cv = $("nv");
  sec.hidden = !c.volume;
  if (!c.volume) return;
  if (typeof niivue === "undefined") { cv.dataset.status = "missing"; $("nv-note").textContent = "NiiVue did not load"; return; }
  try {
    if (!state.nv) {
      state.nv = new niivue.Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: false, crosshairColor: [0, 0.9, 1, 0.6] });
      await state.nv.attachTo("nv");
      state.nv.setRadiologicalConvention(true);
      state.nv.setSliceType(state.nv.sliceTypeMultiplanar);
    }
    if (!state.nv.gl) throw new Error("no WebGL2");
    cv.dataset.status = "loading";
    const hi = scoreAt(c.scale, c.scale.hi_level);
    await state.nv.loadVolumes([
      { url: `api/volume/${ci}/image.nii.gz`, name: "image.nii.gz" },
      { url: `api/volume/${ci}/map.nii.gz`, name: "map.nii.gz", colormap: "warm", opacity: 0.7,
        cal_min: currentThreshold(), cal_max: Math.max(hi, currentThreshold() + 1e-6) },
    ]);
    if (ci !== state.ci) return;
    state.nvCase = ci;
    nvSync();
    cv.dataset.status = "loaded";
    cv.dataset.volumes = state.nv.volumes.length;
  } catch (e) {
    cv.dataset.status = "error";
    $("nv-note").textContent = `NiiVue panel unavailable: ${e.message} (the slice view above has everything)`;
  }
}

function nvSync() {  // the mask threshold and the slice of the canvas view, into NiiVue
  const nv = state.nv, c = state.cases[state.ci];
  if (!nv || state.nvCase !== state.ci || nv.volumes.length < 2) return;
  const t = currentThreshold(), hi = scoreAt(c.scale, c.scale.hi_level);
  nv.volumes[1].cal_min = t;
  nv.volumes[1].cal_max = Math.max(hi, t + 1e-6);
  nv.updateGLVolume();
  const p = nv.scene.crosshairPos;
  nv.scene.crosshairPos = [p[0], p[1], (state.k + 0.5) / c.n_slices];
  nv.drawScene();
}

function setLevel(level) {
  state.level = level;
  $("thr-slider").value = level;
  $("thr-out").textContent = thresholdText();
}

function selectCase(ci, first = false) {
  state.ci = ci;
  const c = state.cases[ci];
  document.querySelectorAll("nav button").forEach((b, i) => b.classList.toggle("active", i === ci));
  $("case-title").textContent = c.title || c.id;
  if (c.error) { showError(c.error); return; }
  const sc = c.scale, sl = $("slice-slider"), th = $("thr-slider");
  sl.max = c.n_slices - 1;
  $("slice-control").hidden = c.n_slices <= 1;
  const k = first && params.has("k") ? Number(params.get("k")) : c.start_slice;
  state.k = Math.max(0, Math.min(c.n_slices - 1, k));
  sl.value = state.k;
  th.min = Math.min(sc.yp[0], sc.lo_level);
  th.max = sc.yp[sc.yp.length - 1];
  const calibrated = c.threshold !== null && c.threshold !== undefined ? levelOf(sc, c.threshold) : (sc.lo_level + sc.hi_level) / 2;
  setLevel(first && params.has("t") ? Number(params.get("t")) : calibrated);
  const [l, r, t, b] = c.labels || ["", "", "", ""];
  $("edge-left").textContent = l; $("edge-right").textContent = r; $("edge-top").textContent = t; $("edge-bottom").textContent = b;
  document.querySelectorAll(".edge").forEach((e) => { e.hidden = !c.labels; });
  $("orientation").textContent = c.orientation_note + (c.input ? ` — input: ${c.input}` : "");
  updateScores();
  loadSlice();
  scheduleComponents();
  nvShow(ci);
}

async function main() {
  if (params.get("map") === "0") $("show-map").checked = false;
  let j;
  try { j = await getJSON("api/cases"); } catch (e) { showError(`cases: ${e.message}`); return; }
  state.cases = j.cases;
  $("folder").textContent = j.folder;
  const nav = $("cases");
  j.cases.forEach((c, i) => {
    const b = document.createElement("button");
    b.textContent = c.title || c.id; b.title = c.id;
    b.addEventListener("click", () => selectCase(i));
    nav.appendChild(b);
  });
  $("slice-slider").addEventListener("input", (e) => { state.k = Number(e.target.value); loadSlice(); });
  $("thr-slider").addEventListener("input", (e) => { setLevel(Number(e.target.value)); draw(); nvSync(); scheduleComponents(); });
  $("thr-reset").addEventListener("click", () => {
    const c = state.cases[state.ci];
    if (c.threshold !== null && c.threshold !== undefined) { setLevel(levelOf(c.scale, c.threshold)); draw(); nvSync(); scheduleComponents(); }
  });
  $("show-map").addEventListener("change", draw);
  $("slice").addEventListener("wheel", (e) => {
    const c = state.cases[state.ci];
    if (!c || c.n_slices <= 1) return;
    e.preventDefault();
    state.k = Math.max(0, Math.min(c.n_slices - 1, state.k + (e.deltaY > 0 ? -1 : 1)));
    $("slice-slider").value = state.k;
    loadSlice();
  }, { passive: false });
  document.addEventListener("keydown", (e) => {  // up/down arrows step through the slices
    const c = state.cases[state.ci];
    if (!c || c.n_slices <= 1 || !["ArrowUp", "ArrowDown"].includes(e.key) || e.target.tagName === "INPUT") return;
    e.preventDefault();
    state.k = Math.max(0, Math.min(c.n_slices - 1, state.k + (e.key === "ArrowUp" ? 1 : -1)));
    $("slice-slider").value = state.k;
    loadSlice();
  });
  const ci = Number(params.get("case") || 0);
  if (j.cases.length) selectCase(Math.max(0, Math.min(j.cases.length - 1, ci)), true);
}

main();
