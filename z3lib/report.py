"""The report stage: landscape, motions, maps and models along motions, subsets, HTML report.

:func:`make_report` is the entry point of rule ``report``. From the refine stage's particles and
coefficients, the preprocess stage's reference, mask and point cloud, and the ZART maps and FSC,
it writes into ``out_dir``:

``report.html``
    a self-contained page (figures embedded as data URIs, no script, no external file needed):
    summary, landscape, motions, mean deformation, FSC curves and table, corrected vs uncorrected
    slices, cluster sizes, the refinement rounds (FSC, landscape and wall time per round) and the
    gold-standard mode, per-stage timings from the benchmark files, the run's configuration, and
    links to every output.
``landscape.tsv``
    per particle (STAR order): cluster, PCA scores, UMAP coordinates (when computed) and the RMS
    deformation (Å).
``landscape_pca.{png,svg}``, ``landscape_umap.{png,svg}``, ``fsc.{png,svg}``, ``slices.png``,
``motions.png``, ``deformation.png``, ``rounds.png`` (with more than one round)
    the figures (``landscape_umap`` says why when UMAP was not computed).
``rounds.tsv``
    per refinement round: half-map FSC 0.143 and 0.5 resolutions of the corrected and uncorrected
    maps, the median RMS deformation and the round's wall time (benchmark files).
``motion/motion_pc{1,2}_NN.mrc`` (+ ``.pdb`` with a model) and ``motion/motion_pc{1,2}.cxc``
    the reference map (and atomic model) deformed along PC1 and PC2 from −2σ to +2σ, and a
    ChimeraX script that plays each series as a movie.
``clusters/cluster_NN.star``, ``.mrc`` (+ ``.pdb``), ``clusters/clusters.cxc``
    per k-means cluster: the refine STAR's rows of that cluster (every input column kept, so
    RELION refines them directly), the reference deformed by the cluster's mean field (and the
    model), and a ChimeraX script showing the cluster maps.
``mean_deformation.mrc``
    mean |d| over particles at every mask voxel (Å).
``particles.xmd``
    the Xmipp/Scipion export with ``sphCoefficients``.

Conventions: maps are written at the processing box (their pixel size and an origin that puts
their centre where the original box's centre is); atomic models stay in the frame of the
original map (Å, origin at voxel 0), deformed with the coefficients in px of the original box
(``Rmax`` = original box / 2). Figures are drawn with matplotlib's Agg canvas (no display needed).
"""

from __future__ import annotations

import base64
import html
import io as _bytes_io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure

from z3lib import analysis as an
from z3lib import zernike as zk
from z3lib.conventions import box_center
from z3lib.io import (
    read_coefficients,
    read_map,
    read_model,
    read_npz,
    read_particles,
    read_star_blocks,
    read_table,
    write_bytes,
    write_map,
    write_model_pdb,
    write_particles_star,
    write_table,
    write_text,
    write_xmipp_particles,
)

__all__ = ["chimerax_series_script", "make_report", "read_round_timings", "read_stage_timings", "render_html",
           "summarise_rounds"]

#: How the report names the gold-standard modes (config ``gold_standard``).
GOLD_STANDARD_NOTES = {
    "shared": "shared: one network and one refinement for all particles; the half sets meet only in ZART",
    "independent": ("independent: each half set has its own networks, refinement and references; no "
                    "information crosses the halves"),
}

#: Pipeline order of the stages in the timing table (others follow, alphabetically).
STAGE_ORDER = ("simulate", "preprocess", "round_reference", "round_reference_half", "train", "train_half", "predict",
               "refine_chunk", "refine", "zart", "publish", "report")

_PNG_DPI = 100
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 0 24px 48px; color: #1d2327; line-height: 1.45; }
h1 { border-bottom: 2px solid #2a6f97; padding-bottom: 6px; }
h2 { color: #2a6f97; margin-top: 36px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: right; }
th { background: #f3f6f8; }
td.l, th.l { text-align: left; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e5e9ee; }
figcaption { font-size: 13px; color: #57606a; margin-top: 4px; }
pre { background: #f6f8fa; padding: 12px; overflow-x: auto; font-size: 13px; }
.note { background: #fff8e1; border-left: 4px solid #f2b705; padding: 6px 12px; }
code { background: #f3f6f8; padding: 0 3px; }
"""


# ==============================================================================================
# Figures
# ==============================================================================================
def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=_PNG_DPI, layout="constrained")


def _encode(fig: Figure, fmt: str) -> bytes:
    buf = _bytes_io.BytesIO()
    # fixed SVG ids and no date: the same data give the same bytes
    with rc_context({"svg.hashsalt": "z3", "svg.fonttype": "path"}):
        fig.savefig(buf, format=fmt, dpi=_PNG_DPI, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def _save_figure(fig: Figure, out: Path, stem: str, formats: Sequence[str], paths: dict[str, Path]) -> bytes:
    """Write the figure as ``stem.<fmt>`` for each format; return the PNG bytes (for embedding)."""
    png = b""
    for fmt in formats:
        data = _encode(fig, fmt)
        path = out / f"{stem}.{fmt}"
        write_bytes(path, data)
        paths[f"{stem}_{fmt}"] = path
        if fmt == "png":
            png = data
    return png or _encode(fig, "png")


def _cluster_colours(k: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def plot_landscape(
    coords: np.ndarray,
    labels: np.ndarray,
    deformation: np.ndarray,
    *,
    axis_labels: tuple[str, str],
    title: str,
    truth: np.ndarray | None = None,
    paths_xy: Sequence[tuple[str, np.ndarray]] = (),
) -> Figure:
    """Scatter of a 2-D landscape coloured by cluster, by RMS deformation (Å) and, when given,
    by the true motion coordinate.

    Parameters
    ----------
    coords
        ``(n, 2)`` landscape coordinates.
    labels
        ``(n,)`` cluster labels ``0…k−1``.
    deformation
        ``(n,)`` RMS deformation per particle (Å).
    truth
        optional ``(n,)`` ground-truth motion coordinate (simulated data).
    paths_xy
        ``(name, (steps, 2))`` positions of motion series to mark.
    """
    panels = 3 if truth is not None else 2
    fig = _new_figure(4.6 * panels, 4.2)
    axes = fig.subplots(1, panels)
    k = int(labels.max()) + 1 if len(labels) else 0
    colours = _cluster_colours(max(k, 1))
    size = float(np.clip(3000.0 / max(len(coords), 1), 4, 40))
    ax = axes[0]
    for j in range(k):
        sel = labels == j
        ax.scatter(coords[sel, 0], coords[sel, 1], s=size, color=colours[j], alpha=0.8, linewidths=0,
                   label=f"cluster {j + 1} ({int(sel.sum())})")
    for name, xy in paths_xy:
        ax.plot(xy[:, 0], xy[:, 1], "k.-", lw=1, ms=6)
        ax.annotate(name, xy[-1], textcoords="offset points", xytext=(4, 4), fontsize=9)
    ax.legend(fontsize=8, loc="best", markerscale=max(1.0, 20.0 / size) ** 0.5)
    ax.set_title("clusters (k-means)")
    ax = axes[1]
    sc = ax.scatter(coords[:, 0], coords[:, 1], s=size, c=deformation, cmap="viridis", linewidths=0)
    fig.colorbar(sc, ax=ax, label="RMS deformation (Å)")
    ax.set_title("deformation size")
    if truth is not None:
        ax = axes[2]
        sc = ax.scatter(coords[:, 0], coords[:, 1], s=size, c=truth, cmap="coolwarm", linewidths=0)
        fig.colorbar(sc, ax=ax, label="true motion coordinate t")
        ax.set_title("ground truth (simulated data)")
    for ax in axes:
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
    fig.suptitle(title)
    return fig


def plot_rounds(landscapes: Sequence[tuple[str, np.ndarray, tuple[str, str]]], colour: np.ndarray) -> Figure:
    """One small PC1/PC2 scatter per refinement round (each round's own PCA), every particle
    coloured by the same value (the final round's PC1 score), so that one sees whether the
    particles keep their places from round to round.

    Parameters
    ----------
    landscapes
        per round: title, ``(n, 2)`` PC1/PC2 scores and the two axis labels.
    colour
        ``(n,)`` value per particle.
    """
    m = len(landscapes)
    cols = min(m, 4)
    rows = (m + cols - 1) // cols
    fig = _new_figure(3.3 * cols, 3.1 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    size = float(np.clip(1500.0 / max(len(colour), 1), 3, 25))
    sc = None
    for ax, (title, xy, labels) in zip(axes, landscapes, strict=False):
        sc = ax.scatter(xy[:, 0], xy[:, 1], s=size, c=colour, cmap="coolwarm", linewidths=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(labels[0], fontsize=8)
        ax.set_ylabel(labels[1], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[m:]:
        ax.axis("off")
    if sc is not None:
        fig.colorbar(sc, ax=list(axes[:m]), label="final round's PC1 score (px)", shrink=0.8)
    fig.suptitle("Landscape per refinement round (PCA of each round's refined coefficients)")
    return fig


def plot_message(title: str, message: str) -> Figure:
    """A placeholder figure that says why a plot is missing."""
    fig = _new_figure(6.0, 2.0)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11)
    ax.set_title(title)
    return fig


def plot_fsc(fsc: pd.DataFrame, summary: Mapping[str, Mapping[str, float]]) -> Figure:
    """FSC curves (corrected vs uncorrected) against frequency, with the 0.143 and 0.5 lines."""
    fig = _new_figure(7.0, 4.2)
    ax = fig.add_subplot()
    f = fsc["frequency"].to_numpy()
    for column, colour, name in (("fsc_corrected", "#2a6f97", "corrected"),
                                 ("fsc_uncorrected", "#c44536", "uncorrected")):
        res = summary[name]
        ax.plot(f, fsc[column], color=colour, lw=2,
                label=f"{name}: {res['fsc_0.143']:.1f} Å (0.143), {res['fsc_0.5']:.1f} Å (0.5)")
    for level, style in ((0.143, ":"), (0.5, "--")):
        ax.axhline(level, color="0.4", ls=style, lw=1)
        ax.text(f[-1], level, f" {level}", va="center", ha="left", fontsize=9, color="0.3")
    ax.axhline(0.0, color="0.8", lw=0.8)
    ax.set_xlim(0, f[-1])
    ax.set_ylim(min(-0.1, float(np.nanmin(fsc[["fsc_corrected", "fsc_uncorrected"]].to_numpy())) - 0.05), 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("half-map FSC")
    top = ax.secondary_xaxis("top", functions=(lambda x: 1.0 / np.maximum(x, 1e-9),
                                               lambda r: 1.0 / np.maximum(r, 1e-9)))
    ticks = np.array([t for t in (50, 30, 20, 15, 10, 8, 6, 5, 4, 3, 2.5, 2) if 1.0 / t <= f[-1]])
    top.set_xticks(ticks)
    top.set_xticklabels([f"{t:g}" for t in ticks])
    top.set_xlabel("resolution (Å)")
    ax.legend(fontsize=9, loc="upper right")
    return fig


def _central_slices(volume: np.ndarray) -> list[np.ndarray]:
    cz, cy, cx = (box_center(n) for n in volume.shape)
    return [volume[cz], volume[:, cy], volume[:, :, cx]]


def plot_slices(maps: Sequence[tuple[str, np.ndarray]], *, cmap: str = "gray",
                colorbar: str | None = None) -> Figure:
    """Central XY, XZ and YZ slices of each map, one row per map."""
    fig = _new_figure(9.0, 3.0 * len(maps) + 0.3)
    axes = np.atleast_2d(fig.subplots(len(maps), 3))
    planes = ("XY (z = centre)", "XZ (y = centre)", "YZ (x = centre)")
    for row, (name, vol) in enumerate(maps):
        lo, hi = float(np.percentile(vol, 0.5)), float(np.percentile(vol, 99.9))
        if hi <= lo:
            lo, hi = float(vol.min()), float(vol.max()) + 1e-12
        for col, img in enumerate(_central_slices(vol)):
            ax = axes[row, col]
            im = ax.imshow(img, cmap=cmap, origin="lower", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: {planes[col]}", fontsize=9)
        if colorbar:
            fig.colorbar(im, ax=list(axes[row]), label=colorbar, shrink=0.8)
    return fig


def plot_motion_series(series: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> Figure:
    """Projections along z of each map of each motion series (one row per series), with the
    outline of the series' middle map for reference."""
    steps = max(len(maps) for _, maps, _ in series)
    fig = _new_figure(1.8 * steps + 0.4, 2.0 * len(series) + 0.4)
    axes = np.atleast_2d(fig.subplots(len(series), steps))
    for row, (name, maps, s) in enumerate(series):
        proj = maps.sum(axis=1)  # (steps, y, x): sum along z
        mid = proj[len(proj) // 2]
        level = 0.35 * float(mid.max()) if mid.max() > 0 else 0.0
        lo, hi = float(proj.min()), float(proj.max()) + 1e-12
        for col in range(steps):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(proj):
                ax.axis("off")
                continue
            ax.imshow(proj[col], cmap="gray", origin="lower", vmin=lo, vmax=hi)
            if level > 0:
                ax.contour(mid, levels=[level], colors=["#f2b705"], linewidths=0.8)
            ax.set_title(f"{name} {s[col]:+.1f}σ", fontsize=9)
    fig.suptitle("maps along the principal motions (projection along z; yellow: middle map)", fontsize=10)
    return fig


# ==============================================================================================
# Timings, ChimeraX scripts, HTML
# ==============================================================================================
def read_stage_timings(benchmark_dir: str | Path | None) -> pd.DataFrame:
    """Per-stage timings from Snakemake benchmark files.

    Parameters
    ----------
    benchmark_dir
        ``benchmarks/<run>/``: one ``<rule>.tsv`` per rule and ``<rule>/<item>.tsv`` per job of a
        scattered rule (e.g. ``refine_chunk/1-of-2.tsv``).

    Returns
    -------
    one row per rule (pipeline order): ``stage``, ``jobs``, ``wall_s`` (sum over jobs; the jobs
    of a scattered rule may run in parallel), ``cpu_s`` (sum), ``max_rss_mb`` (max). Empty when
    the folder or the files are missing.
    """
    columns = ["stage", "jobs", "wall_s", "cpu_s", "max_rss_mb"]
    if benchmark_dir is None or not Path(benchmark_dir).is_dir():
        return pd.DataFrame(columns=columns)
    root = Path(benchmark_dir)
    files: dict[str, list[Path]] = {}
    folders = [root, *sorted(p for p in (root / "rounds").glob("*") if p.is_dir())]  # rounds/<k>/: summed
    for folder in folders:
        for path in sorted(folder.glob("*.tsv")):
            files.setdefault(path.stem, []).append(path)
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "rounds"):
            found = sorted(sub.glob("*.tsv"))
            if found:
                files.setdefault(sub.name, []).extend(found)
    rows = []
    for stage, paths in files.items():
        frames = []
        for path in paths:
            try:
                frames.append(read_table(path))
            except (OSError, ValueError) as exc:  # a foreign or empty file must not sink the report
                logging.getLogger(__name__).warning("skipping benchmark file %s: %s", path, exc)
        if not frames:
            continue
        table = pd.concat(frames, ignore_index=True)

        def total(col: str, t: pd.DataFrame = table) -> float:
            return float(pd.to_numeric(t[col], errors="coerce").sum()) if col in t else float("nan")

        rss = pd.to_numeric(table["max_rss"], errors="coerce").max() if "max_rss" in table else np.nan
        rows.append({"stage": stage, "jobs": len(table), "wall_s": total("s"), "cpu_s": total("cpu_time"),
                     "max_rss_mb": float(rss)})
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    rows.sort(key=lambda r: (order.get(str(r["stage"]), len(order)), str(r["stage"])))
    return pd.DataFrame(rows, columns=columns)


def read_round_timings(benchmark_dir: str | Path | None) -> dict[int, float]:
    """Wall time (s) of each refinement round: the sum of ``s`` over every benchmark file under
    ``benchmarks/<run>/rounds/<k>/`` (the jobs of a round, chunks included; jobs that ran in
    parallel are counted in full). Rounds without benchmark files are left out."""
    out: dict[int, float] = {}
    if benchmark_dir is None:
        return out
    for folder in sorted((Path(benchmark_dir) / "rounds").glob("*")):
        if not (folder.is_dir() and folder.name.isdigit()):
            continue
        total, found = 0.0, False
        for path in sorted(folder.rglob("*.tsv")):
            try:
                table = read_table(path)
            except (OSError, ValueError) as exc:
                logging.getLogger(__name__).warning("skipping benchmark file %s: %s", path, exc)
                continue
            if "s" in table:
                total += float(pd.to_numeric(table["s"], errors="coerce").sum())
                found = True
        if found:
            out[int(folder.name)] = total
    return out


def summarise_rounds(fsc_tables: Sequence[pd.DataFrame], rms_median: Sequence[float],
                     wall: Mapping[int, float]) -> pd.DataFrame:
    """One row per refinement round (1, 2, …): half-map FSC 0.143 and 0.5 resolutions (Å) of the
    corrected and uncorrected maps, the median RMS deformation (Å) and the wall time (s; NaN
    when the round has no benchmark files)."""
    rows = []
    for k, (fsc, rms) in enumerate(zip(fsc_tables, rms_median, strict=True), start=1):
        cor, unc = an.fsc_summary(fsc, "fsc_corrected"), an.fsc_summary(fsc, "fsc_uncorrected")
        rows.append({"round": k, "corrected 0.143 (Å)": cor["fsc_0.143"], "corrected 0.5 (Å)": cor["fsc_0.5"],
                     "uncorrected 0.143 (Å)": unc["fsc_0.143"], "uncorrected 0.5 (Å)": unc["fsc_0.5"],
                     "median RMS deformation (Å)": float(rms), "wall time (s)": wall.get(k, float("nan"))})
    return pd.DataFrame(rows)


def chimerax_series_script(
    maps: Sequence[str],
    *,
    title: str,
    level: float | None = None,
    models: Sequence[str] = (),
    play: bool = True,
) -> str:
    """A ChimeraX command script (``.cxc``) that opens a map series and plays it as a movie.

    ChimeraX runs a ``.cxc`` with its own folder as the current directory, so ``maps`` and
    ``models`` are file names relative to the script. Lines starting with ``#`` are comments (a
    ``#`` inside a command line would be read as a model number, so comments have lines of
    their own).

    Parameters
    ----------
    maps
        The series' MRC files in order; their common ``prefix_`` + ``*.mrc`` glob must match
        exactly these files (ChimeraX sorts the glob, so number them with leading zeros).
    title
        What the series is (first comment line).
    level
        Contour level of the surfaces (map units); ChimeraX's automatic level when None.
    models
        Atomic models along the same series (PDB), played with ``mseries`` alongside the maps.
    play
        Play the maps back and forth in a loop (``vseries play``); False shows a slider instead
        (for unordered sets such as clusters).
    """
    if not maps:
        raise ValueError("a ChimeraX series script needs at least one map")
    stem = maps[0].rsplit("_", 1)[0]
    lines = [
        f"# {title}",
        "# Open in ChimeraX (File > Open, or the command `open <this file>`); file names are",
        "# relative to this script's folder, where ChimeraX runs it.",
        "# Close every open model first, so the map series becomes model #1.",
        "close",
        f"# Open {len(maps)} maps ({maps[0]} ... {maps[-1]}) as one volume series, in file-name order.",
        f"open {stem}_*.mrc vseries true",
    ]
    if level is not None:
        lines += ["# Show the maps as surfaces, contoured at the median of the reference inside the mask.",
                  f"volume #1 style surface level {level:.6g}"]
    else:
        lines += ["# Show the maps as surfaces (ChimeraX's initial contour level).", "volume #1 style surface"]
    if models:
        first, last = 2, 1 + len(models)
        lines += [
            f"# Open the {len(models)} deformed atomic models as models #{first}-{last}, one per map.",
            "open " + " ".join(models),
            f"cartoon #{first}-{last}",
        ]
    lines += ["# Fit everything in the view.", "view"]
    if play:
        lines += ["# Play the map series forward and backward in a loop, at most 4 maps per second",
                  "# (stop with `vseries stop #1`).",
                  "vseries play #1 loop true direction oscillate maxFrameRate 4"]
        if models:
            lines += ["# Play the models as a model series, about 4 models per second at 60 frames/s,",
                      "# repeated 1000 times.",
                      f"mseries #{first}-{last} pauseFrames 15 loop 1000"]
    else:
        lines += ["# A slider to step through the maps (and `vseries play #1` to play them).",
                  "vseries slider #1"]
        if models:
            lines += ["# A slider for the models.", f"mseries slider #{first}-{last}"]
    return "\n".join(lines) + "\n"


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _table(frame: pd.DataFrame, *, left: Sequence[str] = (), formats: Mapping[str, str] | None = None,
           raw_html: Sequence[str] = ()) -> str:
    fmts = dict(formats or {})
    head = "".join(f'<th class="l">{html.escape(str(c))}</th>' if c in left else f"<th>{html.escape(str(c))}</th>"
                   for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for c in frame.columns:
            v = row[c]
            if c in raw_html:
                text = str(v)
            elif c in fmts and isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v):
                text = html.escape(format(v, fmts[c]))
            else:
                text = html.escape(str(v))
            cells.append(f'<td class="l">{text}</td>' if c in left else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _link(path: Path, root: Path, text: str | None = None) -> str:
    rel = path.relative_to(root).as_posix()
    return f'<a href="{html.escape(rel)}">{html.escape(text or rel)}</a>'


def render_html(sections: Sequence[tuple[str, str, str]], *, title: str) -> str:
    """A complete, self-contained HTML5 page: ``sections`` are ``(id, heading, body html)``."""
    nav = " · ".join(f'<a href="#{sid}">{html.escape(head)}</a>' for sid, head, _ in sections)
    body = "\n".join(f'<section id="{sid}"><h2>{html.escape(head)}</h2>\n{content}\n</section>'
                     for sid, head, content in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<nav>{nav}</nav>\n{body}\n"
        "</body>\n</html>\n"
    )


# ==============================================================================================
# Entry point
# ==============================================================================================
def _map_origin(box: int, pixel_size: float, original_box: int, original_pixel_size: float) -> tuple[float, float, float]:
    """MRC origin (Å) that puts a processing-box map's centre on the original box's centre."""
    shift = box_center(original_box) * original_pixel_size - box_center(box) * pixel_size
    return (shift, shift, shift)


def _remove_stale(folder: Path, pattern: str, written: Any, logger: logging.Logger) -> None:
    """Delete files of an earlier run (e.g. with more motion steps or clusters) that this run did
    not write, so the ChimeraX scripts' globs match exactly this run's series."""
    keep = {Path(p).resolve() for p in written}
    for path in sorted(folder.glob(pattern)):
        if path.is_file() and path.resolve() not in keep:
            logger.info("removing %s, left by an earlier run", path)
            path.unlink()


def _contour_level(reference: np.ndarray, mask: np.ndarray) -> float:
    """A surface level for the series: the median of the reference inside the mask."""
    inside = reference[mask > 0.5]
    return float(np.median(inside)) if inside.size else float(reference.max() / 2)


def make_report(
    out_dir: str | Path,
    *,
    particles: str | Path,
    coefficients: str | Path,
    points: str | Path,
    reference: str | Path,
    mask: str | Path,
    corrected: str | Path,
    uncorrected: str | Path,
    fsc: str | Path,
    degrees: tuple[int, int],
    basis: str,
    clusters: int = 3,
    motion_steps: int = 5,
    use_umap: bool = True,
    model: str | Path | None = None,
    model_origin: Sequence[float] = (0.0, 0.0, 0.0),
    ground_truth: str | Path | None = None,
    benchmarks: str | Path | None = None,
    run_config: Mapping[str, Any] | None = None,
    run_name: str = "",
    seed: int = 0,
    pixel_size: float | None = None,
    image_root: str | Path | None = None,
    round_fsc: Sequence[str | Path] = (),
    round_coefficients: Sequence[str | Path] = (),
    gold_standard: str = "shared",
    log: logging.Logger | None = None,
) -> dict[str, Path]:
    """Write the report of one run (see the module docstring for every file).

    Parameters
    ----------
    out_dir
        ``results/<run>/report/``.
    particles, coefficients
        The refine stage's STAR (the input STAR with the Zernike3D columns) and ``(n, 3K)``
        coefficients in px of the original box (``Rmax`` = original box / 2).
    points, reference, mask
        The final round's point cloud (its ``box``, ``original_box``, ``pixel_size`` and
        ``original_pixel_size`` set the units), reference map and mask at the processing box:
        the preprocess stage's in round 1, else those made from the previous round's corrected
        map. The motion and cluster maps are this reference deformed by the fields (the map the
        fields were estimated against).
    corrected, uncorrected, fsc
        The ZART maps and ``fsc.tsv``.
    degrees, basis
        Zernike3D degrees ``(L1, L2)`` and basis of the coefficients.
    clusters
        k of k-means (capped at the number of particles).
    motion_steps
        Maps (and models) per principal-motion series, from −2σ to +2σ.
    use_umap
        Compute the UMAP landscape (skipped, with a logged reason, below 15 particles).
    model
        Optional atomic model (PDB/mmCIF) in the frame of the original map (Å); with it, model
        series along the motions and one model per cluster are written (PDB).
    model_origin
        Position (Å) of voxel ``[0, 0, 0]`` of the original map, in the model's frame.
    ground_truth
        Optional ``ground_truth.tsv`` of simulated data (column ``t``): adds a landscape panel
        coloured by the true motion coordinate and its Spearman correlation with PC1.
    benchmarks
        ``benchmarks/<run>/`` (per-stage timings); None or missing: no timing table.
    run_config
        The run's configuration, shown in the report.
    seed
        Seed of k-means and UMAP.
    pixel_size, image_root
        Overrides for :func:`z3lib.io.read_particles` (as in the refine stage).
    round_fsc, round_coefficients
        Every refinement round's ``fsc.tsv`` and refined ``coefficients.npy`` (round 1 first; the
        last are the final round's); empty: one round, ``fsc`` and ``coefficients``.
    gold_standard
        ``shared`` or ``independent`` (each half set with its own networks and refinement):
        stated in the report.

    Returns
    -------
    name → path of every file written.
    """
    logger = log or logging.getLogger(__name__)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    l1, l2 = int(degrees[0]), int(degrees[1])
    paths: dict[str, Path] = {}

    # --- inputs ------------------------------------------------------------------------------
    parts = read_particles(particles, pixel_size=pixel_size, image_root=image_root)
    blocks = read_star_blocks(particles)
    coeffs = np.asarray(read_coefficients(coefficients), dtype=np.float64)
    n = len(parts)
    k_terms = zk.count_terms(l1, l2)
    if coeffs.shape != (n, 3 * k_terms):
        raise ValueError(f"{coefficients} has shape {coeffs.shape}; {particles} has {n} particles and "
                         f"(L1, L2) = ({l1}, {l2}) needs 3K = {3 * k_terms} coefficients each")
    if n < 2:
        raise ValueError(f"{particles} has {n} particle(s): the landscape needs at least 2")
    cloud = read_npz(points)
    box, orig_box = int(cloud["box"]), int(cloud["original_box"])
    apix, orig_apix = float(cloud["pixel_size"]), float(cloud["original_pixel_size"])
    zblock: dict[str, Any] | None = None
    if "zernike3d" in blocks:
        zblock = {str(k): (v.item() if hasattr(v, "item") else v) for k, v in blocks["zernike3d"].iloc[0].items()}
        if (int(zblock["L1"]), int(zblock["L2"]), str(zblock["basis"]), int(zblock["box"])) != (l1, l2, basis, orig_box):
            raise ValueError(f"{particles}: its data_zernike3d block (L1 {zblock['L1']}, L2 {zblock['L2']}, basis "
                             f"{zblock['basis']}, box {zblock['box']}) disagrees with this run (L1 {l1}, L2 {l2}, "
                             f"basis {basis}, original box {orig_box})")
    ref = read_map(reference).data
    msk = read_map(mask).data
    origin = _map_origin(box, apix, orig_box, orig_apix)
    coeffs_proc = zk.rescale_coefficients(coeffs, orig_box, box)
    logger.info("report: %d particles, (L1, L2) = (%d, %d) %s, box %d px (original %d px)", n, l1, l2, basis,
                box, orig_box)

    # --- landscape ---------------------------------------------------------------------------
    rms_px = an.deformation_rms(coeffs_proc, cloud["points"], l1, l2, basis, box / 2)
    rms_a = rms_px * apix
    pca = an.compute_pca(coeffs)
    umap_xy = None
    if use_umap:
        umap_xy = an.compute_umap(coeffs, seed=seed, log=logger)
    else:
        logger.info("UMAP disabled in the config (report.umap: false)")
    k = min(int(clusters), n)
    if k < clusters:
        logger.warning("%d clusters asked for %d particles: using k = %d", clusters, n, k)
    labels, _ = an.cluster_kmeans(coeffs, k, seed=seed, order_by=pca.scores[:, 0])
    sizes = np.bincount(labels, minlength=k)
    truth = None
    if ground_truth is not None:
        gt = read_table(ground_truth)
        if len(gt) == n and "t" in gt:
            truth = gt["t"].to_numpy(dtype=np.float64)
        else:
            logger.warning("%s does not match the particles (%d rows, %d particles): not shown", ground_truth,
                           len(gt), n)
    n_pc = min(pca.scores.shape[1], 10)
    land = pd.DataFrame({"particle": np.arange(n), "cluster": labels + 1})
    for j in range(n_pc):
        land[f"pc{j + 1}"] = pca.scores[:, j]
    if umap_xy is not None:
        land["umap1"], land["umap2"] = umap_xy[:, 0], umap_xy[:, 1]
    land["deformation_rms_A"] = rms_a
    if truth is not None:
        land["true_t"] = truth
    paths["landscape"] = out / "landscape.tsv"
    write_table(paths["landscape"], land)

    # --- cluster subsets, maps and models ----------------------------------------------------
    clusters_dir = out / "clusters"
    means = an.cluster_means(coeffs, labels, k)
    cluster_maps = an.deform_maps(ref, zk.rescale_coefficients(means, orig_box, box), msk, l1, l2, basis, box / 2)
    atomic = read_model(model) if model is not None else None
    cluster_files = []
    for j in range(k):
        stem = f"cluster_{j + 1:02d}"
        rows = np.nonzero(labels == j)[0]
        star = clusters_dir / f"{stem}.star"
        write_particles_star(star, parts, table=parts.table.iloc[rows], zernike=zblock)
        mrc = clusters_dir / f"{stem}.mrc"
        write_map(mrc, cluster_maps[j], apix, origin=origin)
        files = {"star": star, "mrc": mrc}
        if atomic is not None:
            pdb = clusters_dir / f"{stem}.pdb"
            write_model_pdb(pdb, atomic, an.deform_model(atomic.coords, means[j], l1, l2, basis, orig_box,
                                                         orig_apix, origin=model_origin))
            files["pdb"] = pdb
        cluster_files.append(files)
        for kind, path in files.items():
            paths[f"{stem}_{kind}"] = path
    level = _contour_level(ref, msk)
    paths["clusters_cxc"] = clusters_dir / "clusters.cxc"
    write_text(paths["clusters_cxc"], chimerax_series_script(
        [f["mrc"].name for f in cluster_files], level=level, play=False,
        models=[f["pdb"].name for f in cluster_files if "pdb" in f],
        title=f"z3 run {run_name}: the reference deformed by the mean field of each of {k} k-means clusters",
    ))
    logger.info("clusters: %s particles", ", ".join(str(int(s)) for s in sizes))

    # --- motions along PC1 and PC2 -----------------------------------------------------------
    motion_dir = out / "motion"
    series = []
    paths_pca: list[tuple[str, np.ndarray]] = []
    for comp in range(2):  # n >= 2 vectors of 3K >= 3 entries: PC1 and PC2 always exist
        name = f"pc{comp + 1}"
        if pca.sigmas[comp] <= 0:
            logger.warning("PC%d has zero variance: its motion series repeats the mean map", comp + 1)
        path_c, s = an.component_path(pca, comp, motion_steps, 2.0)
        maps = an.deform_maps(ref, zk.rescale_coefficients(path_c, orig_box, box), msk, l1, l2, basis, box / 2)
        map_names, model_names = [], []
        for i in range(len(s)):
            stem = f"motion_{name}_{i + 1:02d}"
            write_map(motion_dir / f"{stem}.mrc", maps[i], apix, origin=origin)
            paths[f"{stem}_mrc"] = motion_dir / f"{stem}.mrc"
            map_names.append(f"{stem}.mrc")
            if atomic is not None:
                coords = an.deform_model(atomic.coords, path_c[i], l1, l2, basis, orig_box, orig_apix,
                                         origin=model_origin)
                write_model_pdb(motion_dir / f"{stem}.pdb", atomic, coords)
                paths[f"{stem}_pdb"] = motion_dir / f"{stem}.pdb"
                model_names.append(f"{stem}.pdb")
        cxc = motion_dir / f"motion_{name}.cxc"
        write_text(cxc, chimerax_series_script(
            map_names, level=level, models=model_names,
            title=(f"z3 run {run_name}: the reference deformed along PC{comp + 1} "
                   f"({pca.explained_variance_ratio[comp]:.0%} of the variance), {s[0]:+g} to {s[-1]:+g} σ"),
        ))
        paths[f"motion_{name}_cxc"] = cxc
        series.append((name.upper(), maps, s, cxc, map_names, model_names))
        xy = np.zeros((len(s), 2))
        xy[:, comp] = s * pca.sigmas[comp]
        paths_pca.append((name.upper(), xy))

    _remove_stale(motion_dir, "motion_pc*_*", paths.values(), logger)
    _remove_stale(clusters_dir, "cluster_*", paths.values(), logger)

    # --- mean deformation map and Xmipp export -----------------------------------------------
    paths["mean_deformation"] = out / "mean_deformation.mrc"
    mean_def = an.mean_deformation_map(coeffs_proc, msk, l1, l2, basis, box / 2, pixel_size=apix)
    write_map(paths["mean_deformation"], mean_def, apix, origin=origin)
    paths["xmd"] = out / "particles.xmd"
    raw = parts.raw
    cost = raw["zernikeCost"].to_numpy(dtype=np.float64) if "zernikeCost" in raw else None
    zinfo = zblock or {"L1": l1, "L2": l2, "Rmax": orig_box / 2, "basis": basis, "box": orig_box}
    xmd_coeffs = coeffs
    if basis != "xmipp":  # Xmipp/Scipion read sphCoefficients in their own basis (L2 <= 4)
        l2_x = min(l2, 4)
        xmd_coeffs, residual = zk.refit_basis(coeffs, cloud["points"], (l1, l2), basis, (l1, l2_x), "xmipp", box / 2)
        zinfo = {**zinfo, "L2": l2_x, "basis": "xmipp"}
        logger.info("particles.xmd: fields refitted from the %s (%d, %d) basis to Xmipp's (%d, %d): %.1f%% "
                    "relative RMS residual", basis, l1, l2, l1, l2_x, 100 * residual)
    write_xmipp_particles(paths["xmd"], parts.table, xmd_coeffs, deformation=rms_px * orig_box / box, cost=cost,
                          zernike=zinfo)

    # --- figures -----------------------------------------------------------------------------
    var = pca.explained_variance_ratio
    pc_labels = (f"PC1 ({var[0]:.0%} of variance, px)",
                 f"PC2 ({var[1]:.0%} of variance, px)" if len(var) > 1 else "PC2")
    pca_xy = np.zeros((n, 2))
    pca_xy[:, : min(2, pca.scores.shape[1])] = pca.scores[:, :2]
    pngs: dict[str, bytes] = {}
    pngs["landscape_pca"] = _save_figure(
        plot_landscape(pca_xy, labels, rms_a, axis_labels=pc_labels, truth=truth, paths_xy=paths_pca,
                       title="Landscape: PCA of the Zernike3D coefficients"),
        out, "landscape_pca", ("png", "svg"), paths)
    if umap_xy is not None:
        fig = plot_landscape(umap_xy, labels, rms_a, axis_labels=("UMAP 1", "UMAP 2"), truth=truth,
                             title="Landscape: UMAP of the Zernike3D coefficients")
        umap_note = ""
    else:
        umap_note = ("UMAP was not computed: " + ("it is disabled in the config (report.umap)." if not use_umap
                     else f"{n} particles (it needs at least {an.UMAP_MIN_PARTICLES}) or umap-learn is missing "
                          "(see the log)."))
        fig = plot_message("Landscape: UMAP", umap_note)
    pngs["landscape_umap"] = _save_figure(fig, out, "landscape_umap", ("png", "svg"), paths)
    fsc_table = read_table(fsc)
    summary = {name: an.fsc_summary(fsc_table, f"fsc_{name}") for name in ("corrected", "uncorrected")}
    pngs["fsc"] = _save_figure(plot_fsc(fsc_table, summary), out, "fsc", ("png", "svg"), paths)
    cor, unc = read_map(corrected).data, read_map(uncorrected).data
    pngs["slices"] = _save_figure(plot_slices([("corrected", cor), ("uncorrected", unc)]), out, "slices",
                                  ("png",), paths)
    if series:
        pngs["motions"] = _save_figure(plot_motion_series([(nm, maps, s) for nm, maps, s, *_ in series]), out,
                                       "motions", ("png",), paths)
    pngs["deformation"] = _save_figure(
        plot_slices([("mean |d|", mean_def)], cmap="viridis", colorbar="mean deformation (Å)"), out,
        "deformation", ("png",), paths)

    # --- refinement rounds -------------------------------------------------------------------
    fsc_paths = [Path(f) for f in round_fsc] or [Path(fsc)]
    coefficient_paths = [Path(f) for f in round_coefficients] or [Path(coefficients)]
    if len(fsc_paths) != len(coefficient_paths):
        raise ValueError(f"{len(fsc_paths)} rounds of FSC but {len(coefficient_paths)} of coefficients")
    round_fields = []
    for c_path in coefficient_paths:
        c = np.asarray(read_coefficients(c_path), dtype=np.float64)
        if c.shape != coeffs.shape:
            raise ValueError(f"{c_path} has shape {c.shape}; the final round's coefficients have {coeffs.shape}")
        round_fields.append(c)
    rms_median = [float(np.median(an.deformation_rms(zk.rescale_coefficients(c, orig_box, box), cloud["points"],
                                                     l1, l2, basis, box / 2))) * apix for c in round_fields]
    rounds_table = summarise_rounds([read_table(path) for path in fsc_paths], rms_median,
                                    read_round_timings(benchmarks))
    paths["rounds"] = out / "rounds.tsv"
    write_table(paths["rounds"], rounds_table)
    if len(round_fields) > 1:
        panels = []
        for j, c in enumerate(round_fields, start=1):
            r_pca = pca if j == len(round_fields) else an.compute_pca(c)
            xy = np.zeros((n, 2))
            xy[:, : min(2, r_pca.scores.shape[1])] = r_pca.scores[:, :2]
            v = r_pca.explained_variance_ratio
            panels.append((f"round {j}", xy, (f"PC1 ({v[0]:.0%})", f"PC2 ({v[1]:.0%})" if len(v) > 1 else "PC2")))
        pngs["rounds"] = _save_figure(plot_rounds(panels, pca.scores[:, 0]), out, "rounds", ("png",), paths)

    # --- HTML --------------------------------------------------------------------------------
    timings = read_stage_timings(benchmarks)
    spearman = None
    if truth is not None:
        from scipy.stats import spearmanr

        spearman = float(abs(spearmanr(pca.scores[:, 0], truth).statistic))
    sections = _report_sections(
        out=out, run_name=run_name, n=n, degrees=(l1, l2), basis=basis, box=box, orig_box=orig_box, apix=apix,
        orig_apix=orig_apix, pca=pca, labels=labels, rms_a=rms_a, summary=summary, fsc_table=fsc_table,
        pngs=pngs, umap_note=umap_note, series=series, cluster_files=cluster_files, paths=paths,
        timings=timings, run_config=run_config, spearman=spearman, model=model, rounds_table=rounds_table,
        gold_standard=gold_standard,
    )
    paths["html"] = out / "report.html"
    write_text(paths["html"], render_html(sections, title=f"z3 report: run {run_name}" if run_name else "z3 report"))
    logger.info("report written in %.1f s: %s", time.perf_counter() - t0, paths["html"])
    return paths


def _report_sections(
    *, out: Path, run_name: str, n: int, degrees: tuple[int, int], basis: str, box: int, orig_box: int,
    apix: float, orig_apix: float, pca: an.PcaResult, labels: npt.NDArray[np.int64], rms_a: np.ndarray,
    summary: Mapping[str, Mapping[str, float]], fsc_table: pd.DataFrame, pngs: Mapping[str, bytes],
    umap_note: str, series: Sequence[Any], cluster_files: Sequence[Mapping[str, Path]],
    paths: Mapping[str, Path], timings: pd.DataFrame, run_config: Mapping[str, Any] | None,
    spearman: float | None, model: str | Path | None, rounds_table: pd.DataFrame, gold_standard: str,
) -> list[tuple[str, str, str]]:
    esc = html.escape
    k = len(cluster_files)
    sections = []
    overview = pd.DataFrame([
        ("run", run_name or "-"), ("particles", f"{n}"),
        ("Zernike3D degrees", f"L1 = {degrees[0]}, L2 = {degrees[1]} ({basis} basis, 3K = {3 * zk.count_terms(*degrees)})"),
        ("boxes", f"original {orig_box} px at {orig_apix:.4g} Å/px; processing {box} px at {apix:.4g} Å/px"),
        ("RMS deformation", f"median {np.median(rms_a):.2f} Å, 95th percentile {np.percentile(rms_a, 95):.2f} Å"),
        *((f"{name} map", f"{summary[name]['fsc_0.143']:.2f} Å (FSC 0.143), {summary[name]['fsc_0.5']:.2f} Å (FSC 0.5)")
          for name in ("corrected", "uncorrected")),
        ("clusters", ", ".join(f"{j + 1}: {int(s)}" for j, s in enumerate(np.bincount(labels, minlength=k)))),
        ("refinement rounds", f"{len(rounds_table)} (the maps, fields and landscape above are the final round's)"),
        ("gold standard", GOLD_STANDARD_NOTES.get(gold_standard, gold_standard)),
    ], columns=["item", "value"])
    if spearman is not None:
        overview.loc[len(overview)] = ["|Spearman| PC1 vs true t", f"{spearman:.3f}"]
    sections.append(("summary", "Summary", _table(overview, left=("item", "value"))))

    var = pd.DataFrame({"component": [f"PC{j + 1}" for j in range(min(6, len(pca.explained_variance)))]})
    var["σ (px)"] = pca.sigmas[: len(var)]
    var["variance fraction"] = pca.explained_variance_ratio[: len(var)]
    var["cumulative"] = np.cumsum(pca.explained_variance_ratio)[: len(var)]
    rows = []
    for j, files in enumerate(cluster_files):
        sel = labels == j
        links = " ".join(_link(p, out, f".{kind}") for kind, p in files.items())
        rows.append({"cluster": j + 1, "particles": int(sel.sum()), "fraction": sel.mean(),
                     "mean RMS deformation (Å)": float(rms_a[sel].mean()), "files": links})
    clusters_table = pd.DataFrame(rows)
    land = (_img(pngs["landscape_pca"], "PCA landscape",
                 "PCA of the per-particle Zernike3D coefficients (px of the original box), coloured by "
                 "k-means cluster and by RMS deformation over the mask. Black dots: the motion series "
                 "(−2σ…+2σ). SVG: " + _link(paths["landscape_pca_svg"], out) + ".")
            + _table(var, formats={"σ (px)": ".3g", "variance fraction": ".1%", "cumulative": ".1%"})
            + _img(pngs["landscape_umap"], "UMAP landscape",
                   (esc(umap_note) if umap_note else "UMAP of the coefficients, same colours.")
                   + " SVG: " + _link(paths["landscape_umap_svg"], out) + ".")
            + "<h3>Clusters</h3><p>k-means on the coefficients (numbered by increasing mean PC1 score). "
              "Each STAR holds the refine STAR's rows of one cluster with every input column, ready "
              "for a RELION refinement; each map is the reference deformed by the cluster's mean field.</p>"
            + _table(clusters_table, left=("files",), raw_html=("files",),
                     formats={"fraction": ".1%", "mean RMS deformation (Å)": ".2f"})
            + f"<p>ChimeraX: {_link(paths['clusters_cxc'], out)}; per-particle table: "
              f"{_link(paths['landscape'], out)}.</p>")
    sections.append(("landscape", "Conformational landscape", land))

    if series:
        rows = []
        for name, _, s, cxc, map_names, model_names in series:
            rows.append({"motion": name, "steps": len(s), "range": f"{s[0]:+g}σ … {s[-1]:+g}σ",
                         "ChimeraX movie": _link(cxc, out),
                         "maps": f"{_link(cxc.parent / map_names[0], out, map_names[0])} … {esc(map_names[-1])}",
                         "models": (f"{_link(cxc.parent / model_names[0], out, model_names[0])} … {esc(model_names[-1])}"
                                    if model_names else "no model given")})
        motion_html = (_img(pngs["motions"], "motion series",
                            "The reference deformed along PC1 and PC2 (projections along z).")
                       + _table(pd.DataFrame(rows), left=("motion", "ChimeraX movie", "maps", "models"),
                                raw_html=("ChimeraX movie", "maps", "models"))
                       + "<p>Open a <code>.cxc</code> in ChimeraX to play the series as a movie.</p>")
    else:
        motion_html = '<p class="note">No motion series: the coefficients have no variance.</p>'
    if model is None:
        motion_html += ('<p class="note">No atomic model was given (config <code>report.model</code>): '
                        "no model series.</p>")
    sections.append(("motions", "Motions", motion_html))

    sections.append(("deformation", "Mean deformation", _img(
        pngs["deformation"], "mean deformation magnitude",
        "Mean |d| over particles at every mask voxel (Å), central slices: "
        + _link(paths["mean_deformation"], out) + ".")))

    fsc_rows = fsc_table[["shell", "resolution", "fsc_corrected", "fsc_uncorrected"]].rename(
        columns={"resolution": "resolution (Å)", "fsc_corrected": "FSC corrected", "fsc_uncorrected": "FSC uncorrected"})
    recon = (_img(pngs["fsc"], "FSC curves",
                  "Half-map FSC of the ZART reconstructions with (corrected) and without (uncorrected) the "
                  "deformation fields. SVG: " + _link(paths["fsc_svg"], out) + ".")
             + "<details><summary>FSC table</summary>"
             + _table(fsc_rows, formats={"resolution (Å)": ".2f", "FSC corrected": ".3f", "FSC uncorrected": ".3f"})
             + "</details>"
             + _img(pngs["slices"], "central slices", "Central slices of the corrected and uncorrected maps."))
    sections.append(("reconstruction", "Reconstruction", recon))

    rounds_html = (f"<p>Gold standard: {esc(GOLD_STANDARD_NOTES.get(gold_standard, gold_standard))}. Round 1 "
                   "refines against the consensus reference; each later round fine-tunes the previous round's "
                   "network against the previous round's corrected map (and a mask made from it).</p>"
                   + _table(rounds_table.astype(object).where(rounds_table.notna(), "–"),
                            formats={c: ".2f" for c in rounds_table.columns} | {"round": ".0f", "wall time (s)": ".1f"})
                   + "<p>Half-map FSC resolutions of each round's ZART maps; wall time: the round's jobs "
                     "summed from the Snakemake benchmark files (– when missing). Table: "
                   + _link(paths["rounds"], out) + ".</p>")
    if "rounds" in pngs:
        rounds_html += _img(pngs["rounds"], "landscape per round",
                            "PC1/PC2 of each round's refined coefficients, every particle coloured by its final "
                            "PC1 score.")
    sections.append(("rounds", "Refinement rounds", rounds_html))

    if len(timings):
        timing_html = _table(timings.rename(columns={"wall_s": "wall (s)", "cpu_s": "CPU (s)",
                                                     "max_rss_mb": "max RSS (MB)"}),
                             left=("stage",), formats={"wall (s)": ".1f", "CPU (s)": ".1f", "max RSS (MB)": ".0f"})
        timing_html += ("<p>From the Snakemake benchmark files (wall time summed over a rule's jobs; the "
                        "report's own time is not yet recorded when it is written).</p>")
    else:
        timing_html = '<p class="note">No benchmark files found.</p>'
    sections.append(("timings", "Timings", timing_html))

    config_text = json.dumps(run_config, indent=2, default=str) if run_config is not None else "(not given)"
    sections.append(("parameters", "Run parameters", f"<pre>{esc(config_text)}</pre>"))

    listed = sorted({p for key, p in paths.items() if key != "html"}, key=lambda p: p.relative_to(out).as_posix())
    items = "".join(f"<li>{_link(p, out)}</li>" for p in listed)
    sections.append(("outputs", "Outputs", f"<ul>{items}</ul>"))
    return sections
