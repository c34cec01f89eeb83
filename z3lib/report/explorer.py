"""``landscape.html``: the landscape as a page to choose particles in (offline, one file).

The page draws every particle on a canvas, in PCA (any two components) or UMAP coordinates,
coloured by k-means cluster or by RMS deformation; it pans (drag with the pan tool), zooms (the
mouse wheel, about the pointer) and selects with a box or a lasso (shift adds to the selection, alt
removes from it). "Save selection" downloads ``selection.txt``: the header line
:data:`z3lib.selection.SELECTION_HEADER` and one 0-based particle row per line, which the
pipeline's ``select.file`` turns into a RELION STAR and a cryoSPARC ``.cs`` (rule ``select``).

The data sit in the page as JSON and the script is inline: no network, no external file, so it
works from the results folder. ``window.z3explorer`` exposes the page's state for scripts and
tests (views, tools, the data ↔ client-pixel transform, the selection).
"""

from __future__ import annotations

import html
import json
from typing import Any

import numpy as np
import pandas as pd

from z3lib.selection import SELECTION_HEADER

__all__ = ["explorer_html"]

#: Significant digits kept of each coordinate in the page (the selection is tested on these values).
DIGITS = 6

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 16px;
       color: #1d2327; }
h1 { font-size: 20px; margin: 0 0 8px; }
#controls { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin: 8px 0; font-size: 14px; }
#controls fieldset { border: 1px solid #d0d7de; padding: 2px 8px; }
#plot { border: 1px solid #d0d7de; cursor: crosshair; touch-action: none; }
#status { font-size: 14px; margin: 6px 0; }
#legend { font-size: 13px; color: #57606a; }
.sw { display: inline-block; width: 10px; height: 10px; margin: 0 3px 0 10px; }
p.help { font-size: 13px; color: #57606a; max-width: 900px; }
"""

_SCRIPT = r"""
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('z3-data').textContent);
  var n = data.n, cols = data.columns;
  var canvas = document.getElementById('plot'), ctx = canvas.getContext('2d');
  var W = canvas.width, H = canvas.height, M = 24;
  var PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2',
                 '#7f7f7f', '#bcbd22', '#17becf'];
  var RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  var state = { view: 'pca', x: 'pc1', y: 'pc2', colour: 'cluster', tool: 'lasso',
                zoom: {}, selected: new Uint8Array(n), gesture: null };
  var el = function (id) { return document.getElementById(id); };

  function axes() { return state.view === 'umap' ? ['umap1', 'umap2'] : [state.x, state.y]; }
  function key() { return axes().join('/'); }
  function bounds() {
    var a = axes(), b = [Infinity, -Infinity, Infinity, -Infinity], i;
    for (i = 0; i < n; i++) {
      var x = cols[a[0]][i], y = cols[a[1]][i];
      if (x < b[0]) { b[0] = x; } if (x > b[1]) { b[1] = x; }
      if (y < b[2]) { b[2] = y; } if (y > b[3]) { b[3] = y; }
    }
    if (!(b[1] > b[0])) { b[0] -= 1; b[1] += 1; }
    if (!(b[3] > b[2])) { b[2] -= 1; b[3] += 1; }
    return b;
  }
  function view() {
    var k = key();
    if (!state.zoom[k]) {
      var b = bounds(), s = Math.min((W - 2 * M) / (b[1] - b[0]), (H - 2 * M) / (b[3] - b[2]));
      // canvas = (x * s + ox, -y * s + oy): y up, equal scales on both axes
      state.zoom[k] = { s: s, ox: W / 2 - s * (b[0] + b[1]) / 2, oy: H / 2 + s * (b[2] + b[3]) / 2 };
    }
    return state.zoom[k];
  }
  function toCanvas(x, y) { var v = view(); return [x * v.s + v.ox, -y * v.s + v.oy]; }
  function toData(cx, cy) { var v = view(); return [(cx - v.ox) / v.s, -(cy - v.oy) / v.s]; }
  function eventCanvas(e) {
    var r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * W / r.width, (e.clientY - r.top) * H / r.height];
  }
  function colourOf(i) {
    if (state.colour === 'cluster') { return PALETTE[(cols.cluster[i] - 1) % PALETTE.length]; }
    var t = (cols.deformation[i] - data.deformation_range[0]) /
            Math.max(1e-12, data.deformation_range[1] - data.deformation_range[0]);
    t = Math.min(1, Math.max(0, t)) * (RAMP.length - 1);
    var j = Math.min(RAMP.length - 2, Math.floor(t)), f = t - j, c = [0, 0, 0];
    for (var q = 0; q < 3; q++) { c[q] = Math.round(RAMP[j][q] * (1 - f) + RAMP[j + 1][q] * f); }
    return 'rgb(' + c.join(',') + ')';
  }
  function count() { var m = 0; for (var i = 0; i < n; i++) { m += state.selected[i]; } return m; }

  function render() {
    var a = axes(), any = count() > 0, i, p;
    ctx.clearRect(0, 0, W, H);
    ctx.globalAlpha = any ? 0.25 : 0.8;
    for (i = 0; i < n; i++) {
      if (state.selected[i]) { continue; }
      p = toCanvas(cols[a[0]][i], cols[a[1]][i]);
      ctx.fillStyle = colourOf(i); ctx.fillRect(p[0] - 1.5, p[1] - 1.5, 3, 3);
    }
    ctx.globalAlpha = 1;
    for (i = 0; i < n; i++) {
      if (!state.selected[i]) { continue; }
      p = toCanvas(cols[a[0]][i], cols[a[1]][i]);
      ctx.fillStyle = '#000'; ctx.fillRect(p[0] - 2.5, p[1] - 2.5, 5, 5);
      ctx.fillStyle = colourOf(i); ctx.fillRect(p[0] - 1.5, p[1] - 1.5, 3, 3);
    }
    var g = state.gesture;
    if (g && (g.kind === 'box' || g.kind === 'lasso')) {
      ctx.strokeStyle = '#d62728'; ctx.lineWidth = 1; ctx.setLineDash([4, 3]); ctx.beginPath();
      if (g.kind === 'box') {
        ctx.rect(g.pts[0][0], g.pts[0][1], g.last[0] - g.pts[0][0], g.last[1] - g.pts[0][1]);
      } else {
        ctx.moveTo(g.pts[0][0], g.pts[0][1]);
        for (i = 1; i < g.pts.length; i++) { ctx.lineTo(g.pts[i][0], g.pts[i][1]); }
        ctx.closePath();
      }
      ctx.stroke(); ctx.setLineDash([]);
    }
    ctx.fillStyle = '#57606a'; ctx.font = '12px sans-serif';
    ctx.fillText(a[0] + ' →', W - 70, H - 6); ctx.fillText('↑ ' + a[1], 4, 14);
    status();
  }
  function status() {
    var m = count(), per = {}, i, parts = [];
    for (i = 0; i < n; i++) { if (state.selected[i]) { per[cols.cluster[i]] = (per[cols.cluster[i]] || 0) + 1; } }
    Object.keys(per).sort(function (u, v) { return u - v; }).forEach(function (c) {
      parts.push('cluster ' + c + ': ' + per[c]);
    });
    el('status').textContent = m + ' of ' + n + ' particles selected' +
      (parts.length ? ' (' + parts.join(', ') + ')' : '');
    el('save').disabled = m === 0;
  }

  function inside(poly, x, y) {  // even-odd ray casting, in data coordinates
    var c = false;
    for (var i = 0, j = poly.length - 1; i < poly.length; j = i++) {
      var xi = poly[i][0], yi = poly[i][1], xj = poly[j][0], yj = poly[j][1];
      if ((yi > y) !== (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi) { c = !c; }
    }
    return c;
  }
  function apply(test, mode) {
    var a = axes();
    for (var i = 0; i < n; i++) {
      var hit = test(cols[a[0]][i], cols[a[1]][i]);
      if (mode === 'add') { if (hit) { state.selected[i] = 1; } }
      else if (mode === 'remove') { if (hit) { state.selected[i] = 0; } }
      else { state.selected[i] = hit ? 1 : 0; }
    }
  }
  function finish(g) {
    if (g.kind === 'box') {
      var p = toData(g.pts[0][0], g.pts[0][1]), q = toData(g.last[0], g.last[1]);
      var x0 = Math.min(p[0], q[0]), x1 = Math.max(p[0], q[0]), y0 = Math.min(p[1], q[1]), y1 = Math.max(p[1], q[1]);
      apply(function (x, y) { return x >= x0 && x <= x1 && y >= y0 && y <= y1; }, g.mode);
      state.lastShape = [[x0, y0], [x1, y1]];
    } else if (g.kind === 'lasso' && g.pts.length >= 3) {
      var poly = g.pts.map(function (c) { return toData(c[0], c[1]); });
      apply(function (x, y) { return inside(poly, x, y); }, g.mode);
      state.lastShape = poly;
    }
  }

  canvas.addEventListener('pointerdown', function (e) {
    var c = eventCanvas(e);
    var kind = (state.tool === 'pan' || e.button === 1) ? 'pan' : state.tool;
    state.gesture = { kind: kind, pts: [c], last: c, mode: e.shiftKey ? 'add' : (e.altKey ? 'remove' : 'replace') };
    e.preventDefault();
  });
  window.addEventListener('pointermove', function (e) {
    var g = state.gesture; if (!g) { return; }
    var c = eventCanvas(e);
    if (g.kind === 'pan') { var v = view(); v.ox += c[0] - g.last[0]; v.oy += c[1] - g.last[1]; }
    else if (g.kind === 'lasso') { g.pts.push(c); }
    g.last = c; render();
  });
  window.addEventListener('pointerup', function (e) {
    var g = state.gesture; if (!g) { return; }
    g.last = eventCanvas(e);
    if (g.kind === 'lasso') { g.pts.push(g.last); }
    state.gesture = null;
    if (g.kind !== 'pan') { finish(g); }
    render();
  });
  canvas.addEventListener('wheel', function (e) {
    var c = eventCanvas(e), v = view(), f = Math.exp(-e.deltaY * 0.0015);
    v.s *= f; v.ox = c[0] - (c[0] - v.ox) * f; v.oy = c[1] - (c[1] - v.oy) * f;
    e.preventDefault(); render();
  }, { passive: false });

  function selectedRows() {
    var r = [];
    for (var i = 0; i < n; i++) { if (state.selected[i]) { r.push(i); } }
    return r;
  }
  function selectionText() { return data.header + '\n' + selectedRows().map(String).join('\n') + '\n'; }
  function setView(v) {
    state.view = (v === 'umap' && cols.umap1) ? 'umap' : 'pca';
    el('view').value = state.view; sync(); render();
  }
  function sync() {
    el('x').disabled = el('y').disabled = state.view === 'umap';
    el('x').value = state.x; el('y').value = state.y; el('colour').value = state.colour;
    Array.prototype.forEach.call(document.querySelectorAll('input[name=tool]'), function (r) {
      r.checked = r.value === state.tool;
    });
    el('legend').innerHTML = state.colour === 'cluster'
      ? data.clusters.map(function (c) {
        return '<span class="sw" style="background:' + PALETTE[(c - 1) % PALETTE.length] + '"></span>cluster ' + c;
      }).join('')
      : 'RMS deformation ' + data.deformation_range[0].toFixed(2) + ' Å (purple) … ' +
        data.deformation_range[1].toFixed(2) + ' Å (yellow)';
  }

  ['x', 'y'].forEach(function (id) {
    data.pcs.forEach(function (name) {
      var o = document.createElement('option'); o.value = o.textContent = name; el(id).appendChild(o);
    });
    el(id).addEventListener('change', function () { state[id] = el(id).value; render(); });
  });
  if (!cols.umap1) { el('view').querySelector('option[value=umap]').disabled = true; }
  el('view').addEventListener('change', function () { setView(el('view').value); });
  el('colour').addEventListener('change', function () { state.colour = el('colour').value; sync(); render(); });
  Array.prototype.forEach.call(document.querySelectorAll('input[name=tool]'), function (r) {
    r.addEventListener('change', function () { state.tool = r.value; });
  });
  el('clear').addEventListener('click', function () { state.selected.fill(0); render(); });
  el('invert').addEventListener('click', function () {
    for (var i = 0; i < n; i++) { state.selected[i] = 1 - state.selected[i]; }
    render();
  });
  el('reset').addEventListener('click', function () { delete state.zoom[key()]; render(); });
  el('save').addEventListener('click', function () {
    var a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([selectionText()], { type: 'text/plain' }));
    a.download = 'selection.txt'; document.body.appendChild(a); a.click(); a.remove();
  });

  window.z3explorer = {
    n: n,
    setView: setView,
    setAxes: function (x, y) { state.x = x; state.y = y; sync(); render(); },
    setTool: function (t) { state.tool = t; sync(); },
    setColour: function (c) { state.colour = c; sync(); render(); },
    dataToClient: function (x, y) {
      var c = toCanvas(x, y), r = canvas.getBoundingClientRect();
      return [r.left + c[0] * r.width / W, r.top + c[1] * r.height / H];
    },
    clientToData: function (x, y) { return toData.apply(null, eventCanvas({ clientX: x, clientY: y })); },
    selected: selectedRows,
    selectionText: selectionText,
    lastShape: function () { return state.lastShape; },
    clear: function () { state.selected.fill(0); render(); }
  };
  sync(); render();
})();
"""


def _rounded(values: Any) -> list[float]:
    """Finite values as JSON numbers with :data:`DIGITS` significant digits."""
    arr = np.asarray(values, dtype=np.float64)
    return [float(f"{v:.{DIGITS}g}") for v in arr.tolist()]


def explorer_html(landscape: pd.DataFrame, *, run_name: str) -> str:
    """Return the interactive landscape page of a run (one self-contained HTML5 document).

    Parameters
    ----------
    landscape
        ``landscape.tsv`` as written by the report: ``particle`` (0…n−1), ``cluster`` (1…k),
        ``pc1`` … (px), optionally ``umap1``/``umap2``, ``deformation_rms_A`` (Å).
    run_name
        Shown in the title.

    Returns
    -------
    The page's text (UTF-8). Coordinates are kept to :data:`DIGITS` significant digits.
    """
    n = len(landscape)
    if not np.array_equal(landscape["particle"].to_numpy(), np.arange(n)):
        raise ValueError("explorer_html: landscape rows must be the particles 0…n−1 in order")
    pcs = [c for c in landscape.columns if c.startswith("pc") and c[2:].isdigit()]
    columns: dict[str, Any] = {name: _rounded(landscape[name]) for name in pcs}
    if "umap1" in landscape.columns:
        columns["umap1"], columns["umap2"] = _rounded(landscape["umap1"]), _rounded(landscape["umap2"])
    columns["cluster"] = [int(c) for c in landscape["cluster"].tolist()]
    deformation = _rounded(landscape["deformation_rms_A"])
    columns["deformation"] = deformation
    payload = {
        "n": n,
        "run": run_name,
        "header": f"{SELECTION_HEADER} (run {run_name}, {n} particles)",
        "pcs": pcs,
        "clusters": sorted({int(c) for c in columns["cluster"]}),
        "deformation_range": [min(deformation, default=0.0), max(deformation, default=1.0)],
        "columns": columns,
    }
    blob = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(f"z3 run {run_name}: the landscape ({n} particles)")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{title}</h1>
<div id="controls">
  <label>View <select id="view"><option value="pca">PCA</option><option value="umap">UMAP</option></select></label>
  <label>x <select id="x"></select></label>
  <label>y <select id="y"></select></label>
  <label>Colour <select id="colour"><option value="cluster">cluster</option>
    <option value="deformation">RMS deformation</option></select></label>
  <fieldset><legend>Tool</legend>
    <label><input type="radio" name="tool" value="lasso"> lasso</label>
    <label><input type="radio" name="tool" value="box"> box</label>
    <label><input type="radio" name="tool" value="pan"> pan</label></fieldset>
  <button id="clear" type="button">Clear</button>
  <button id="invert" type="button">Invert</button>
  <button id="reset" type="button">Reset zoom</button>
  <button id="save" type="button">Save selection</button>
</div>
<div id="legend"></div>
<canvas id="plot" width="900" height="640"></canvas>
<div id="status"></div>
<p class="help">Drag to select with the lasso or the box (shift: add, alt: remove), drag with the pan
tool (or the middle button) to move, the wheel zooms. "Save selection" downloads
<code>selection.txt</code> (0-based particle rows of <code>landscape.tsv</code>); set
<code>select: {{file: selection.txt}}</code> in the run's config and run Snakemake again: it writes
<code>results/{html.escape(run_name)}/select/particles.star</code> (RELION, every input column) and
<code>particles.cs</code> (cryoSPARC).</p>
<script type="application/json" id="z3-data">{blob}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""
