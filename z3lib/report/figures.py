"""The report's figures: matplotlib's Agg canvas (no display needed), PNG and SVG.

Every figure is a :class:`matplotlib.figure.Figure` made without pyplot; :func:`save_figure`
writes it with fixed SVG ids and no date, so the same data give the same bytes.
"""

from __future__ import annotations

import io as _bytes_io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure

from z3lib import analysis as an
from z3lib.conventions import box_center
from z3lib.io import write_bytes

__all__ = [
    "plot_fsc",
    "plot_landscape",
    "plot_message",
    "plot_motion_series",
    "plot_rounds",
    "plot_slices",
    "save_figure",
]

_PNG_DPI = 100


def _new_figure(width: float, height: float) -> Figure:
    """Return an empty constrained-layout figure of ``width`` × ``height`` inches at the PNG resolution."""
    return Figure(figsize=(width, height), dpi=_PNG_DPI, layout="constrained")


def _encode(fig: Figure, fmt: str) -> bytes:
    """Return the figure's bytes in ``fmt`` (``png`` or ``svg``), reproducible."""
    buf = _bytes_io.BytesIO()
    # fixed SVG ids and no date: the same data give the same bytes
    with rc_context({"svg.hashsalt": "z3", "svg.fonttype": "path"}):
        fig.savefig(buf, format=fmt, dpi=_PNG_DPI, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def save_figure(fig: Figure, out: Path, stem: str, formats: Sequence[str], paths: dict[str, Path]) -> bytes:
    """Write the figure as ``stem.<fmt>`` for each format; return the PNG bytes (for embedding).

    Parameters
    ----------
    fig
        The figure.
    out
        Folder of the files.
    stem
        File name without extension; also the key prefix in ``paths``.
    formats
        ``png`` and/or ``svg``, in writing order.
    paths
        Updated in place: ``<stem>_<fmt>`` → path of each file written.

    Returns
    -------
    The PNG bytes (encoded without writing when ``png`` is not among ``formats``).
    """
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
    """``k`` RGBA colours of the tab10 (k ≤ 10) or tab20 colour map."""
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
    """Plot a 2-D landscape coloured by cluster, by RMS deformation (Å) and by the true motion.

    The third panel, coloured by the true motion coordinate, appears only when ``truth`` is given.

    Parameters
    ----------
    coords
        ``(n, 2)`` landscape coordinates.
    labels
        ``(n,)`` cluster labels ``0…k−1``.
    deformation
        ``(n,)`` RMS deformation per particle (Å).
    axis_labels
        Labels of the two axes.
    title
        The figure's title.
    truth
        optional ``(n,)`` ground-truth motion coordinate (simulated data).
    paths_xy
        ``(name, (steps, 2))`` positions of motion series to mark.

    Returns
    -------
    Two panels (three with ``truth``).
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
        ax.scatter(
            coords[sel, 0],
            coords[sel, 1],
            s=size,
            color=colours[j],
            alpha=0.8,
            linewidths=0,
            label=f"cluster {j + 1} ({int(sel.sum())})",
        )
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
    """Plot one small PC1/PC2 scatter per refinement round (each round's own PCA).

    Every particle is coloured by the same value (the final round's PC1 score), so that one sees
    whether the particles keep their places from round to round.

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
    """Draw a placeholder figure that says why a plot is missing.

    Parameters
    ----------
    title
        The missing plot's title.
    message
        Why it is missing.
    """
    fig = _new_figure(6.0, 2.0)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11)
    ax.set_title(title)
    return fig


def plot_fsc(
    fsc: pd.DataFrame,
    summary: Mapping[str, Mapping[str, float]],
    other: tuple[str, pd.DataFrame] | None = None,
) -> Figure:
    """FSC curves (corrected vs uncorrected) against frequency, with the 0.143 and 0.5 lines.

    Parameters
    ----------
    fsc
        ``frequency`` (1/Å), ``fsc_corrected`` and ``fsc_uncorrected`` per shell.
    summary
        ``corrected``/``uncorrected`` → ``fsc_0.143``/``fsc_0.5`` → resolution (Å), for the legend.
    other
        Optional name and ``fsc.tsv`` of another run (same shells): its corrected curve, dashed.
    """
    fig = _new_figure(7.0, 4.2)
    ax = fig.add_subplot()
    f = fsc["frequency"].to_numpy()
    for column, colour, name in (
        ("fsc_corrected", "#2a6f97", "corrected"),
        ("fsc_uncorrected", "#c44536", "uncorrected"),
    ):
        res = summary[name]
        ax.plot(
            f,
            fsc[column],
            color=colour,
            lw=2,
            label=f"{name}: {res['fsc_0.143']:.1f} Å (0.143), {res['fsc_0.5']:.1f} Å (0.5)",
        )
    if other is not None:
        name, table = other
        res = an.fsc_summary(table, "fsc_corrected")
        ax.plot(
            f,
            table["fsc_corrected"].to_numpy()[: len(f)],
            color="#2a6f97",
            lw=1.5,
            ls="--",
            label=f"corrected, {name}: {res['fsc_0.143']:.1f} Å (0.143), {res['fsc_0.5']:.1f} Å (0.5)",
        )
    for level, style in ((0.143, ":"), (0.5, "--")):
        ax.axhline(level, color="0.4", ls=style, lw=1)
        ax.text(f[-1], level, f" {level}", va="center", ha="left", fontsize=9, color="0.3")
    ax.axhline(0.0, color="0.8", lw=0.8)
    ax.set_xlim(0, f[-1])
    ax.set_ylim(min(-0.1, float(np.nanmin(fsc[["fsc_corrected", "fsc_uncorrected"]].to_numpy())) - 0.05), 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("half-map FSC")
    top = ax.secondary_xaxis(
        "top", functions=(lambda x: 1.0 / np.maximum(x, 1e-9), lambda r: 1.0 / np.maximum(r, 1e-9))
    )
    ticks = np.array([t for t in (50, 30, 20, 15, 10, 8, 6, 5, 4, 3, 2.5, 2) if 1.0 / t <= f[-1]])
    top.set_xticks(ticks)
    top.set_xticklabels([f"{t:g}" for t in ticks])
    top.set_xlabel("resolution (Å)")
    ax.legend(fontsize=9, loc="upper right")
    return fig


def _central_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Return the XY, XZ and YZ planes of a ``(z, y, x)`` volume through its centre voxel."""
    cz, cy, cx = (box_center(n) for n in volume.shape)
    return [volume[cz], volume[:, cy], volume[:, :, cx]]


def plot_slices(maps: Sequence[tuple[str, np.ndarray]], *, cmap: str = "gray", colorbar: str | None = None) -> Figure:
    """Central XY, XZ and YZ slices of each map, one row per map.

    Parameters
    ----------
    maps
        ``(name, (z, y, x) volume)`` per row; each row is scaled to its 0.5–99.9 percentiles.
    cmap
        Matplotlib colour map.
    colorbar
        Label of a colour bar per row (None: no colour bar).
    """
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
    """Plot projections along z of each map of each motion series (one row per series).

    Each map carries the outline of the series' middle map for reference.

    Parameters
    ----------
    series
        Per series: name, ``(steps, z, y, x)`` maps and ``(steps,)`` positions (σ).
    """
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
