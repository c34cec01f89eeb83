"""The report's HTML page: one self-contained HTML5 file, its sections in a fixed order.

Figures are embedded as PNG data URIs; there is no script and no external file. Each section is
made by one function of :class:`ReportContent`.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from z3lib.report.records import (
    ClusterSet,
    Landscape,
    MotionSeries,
    Reconstruction,
    ReportData,
    ReportInputs,
)

__all__ = ["GOLD_STANDARD_NOTES", "ReportContent", "render_html", "render_report", "report_sections"]

#: How the report names the gold-standard modes (config ``gold_standard``).
GOLD_STANDARD_NOTES = {
    "shared": "shared: one network and one refinement for all particles; the half sets meet only in ZART",
    "independent": (
        "independent: each half set has its own networks, refinement and references; no information crosses the halves"
    ),
}

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


def _img(png: bytes, alt: str, caption: str) -> str:
    """Return a ``<figure>`` with the PNG embedded as a data URI; ``caption`` is HTML."""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _table(
    frame: pd.DataFrame,
    *,
    left: Sequence[str] = (),
    formats: Mapping[str, str] | None = None,
    raw_html: Sequence[str] = (),
) -> str:
    """Render ``frame`` as an HTML table.

    Parameters
    ----------
    frame
        One ``<tr>`` per row, the columns' names as headings.
    left
        Columns aligned left (the others right).
    formats
        Column → format spec of its finite numbers (others are shown with ``str``).
    raw_html
        Columns whose values are HTML already (not escaped).
    """
    fmts = dict(formats or {})
    head = "".join(
        f'<th class="l">{html.escape(str(c))}</th>' if c in left else f"<th>{html.escape(str(c))}</th>"
        for c in frame.columns
    )
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
    """Return an ``<a>`` to ``path`` relative to ``root`` (the report's folder).

    It shows ``text``, or the relative path.
    """
    rel = path.relative_to(root).as_posix()
    return f'<a href="{html.escape(rel)}">{html.escape(text or rel)}</a>'


def render_html(sections: Sequence[tuple[str, str, str]], *, title: str) -> str:
    """Render a complete, self-contained HTML5 page.

    Parameters
    ----------
    sections
        ``(id, heading, body html)`` in page order; the page opens with links to each.
    title
        The page's title and ``<h1>``.
    """
    nav = " · ".join(f'<a href="#{sid}">{html.escape(head)}</a>' for sid, head, _ in sections)
    body = "\n".join(
        f'<section id="{sid}"><h2>{html.escape(head)}</h2>\n{content}\n</section>' for sid, head, content in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<nav>{nav}</nav>\n{body}\n"
        "</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------------------------
# The report's sections
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ReportContent:
    """Everything the report's page shows.

    Attributes
    ----------
    out
        The report's folder (links are relative to it).
    inputs
        The report's inputs (run name, configuration, model, gold-standard mode).
    data
        The particles, boxes and pixel sizes.
    landscape
        PCA, UMAP, clusters and RMS deformation (Å).
    clusters
        The files of each cluster.
    series
        The motion series (PC1, PC2).
    reconstruction
        FSC table and resolutions of the ZART maps.
    rounds
        One row per refinement round (:func:`z3lib.report.summarise_rounds`).
    timings
        Per-stage timings (:func:`z3lib.report.read_stage_timings`), possibly empty.
    spearman
        |Spearman| correlation of PC1 with the true motion coordinate (simulated data), or None.
    pngs
        Figure name (``landscape_pca``, ``landscape_umap``, ``fsc``, ``slices``, ``motions``,
        ``deformation``, ``rounds``) → PNG bytes.
    paths
        Output name → path of every file written before the page.
    """

    out: Path
    inputs: ReportInputs
    data: ReportData
    landscape: Landscape
    clusters: ClusterSet
    series: Sequence[MotionSeries]
    reconstruction: Reconstruction
    rounds: pd.DataFrame
    timings: pd.DataFrame
    spearman: float | None
    pngs: Mapping[str, bytes]
    paths: Mapping[str, Path]


Section = tuple[str, str, str]


def _summary(c: ReportContent) -> Section:
    """Run, particles, degrees, boxes, deformation, resolutions, clusters, rounds, gold standard."""
    d, land, summary = c.data, c.landscape, c.reconstruction.summary
    spec, rms_a = d.spec, land.rms_a
    overview = pd.DataFrame(
        [
            ("run", c.inputs.run_name or "-"),
            ("particles", f"{d.n}"),
            ("Zernike3D degrees", f"L1 = {spec.L1}, L2 = {spec.L2} ({spec.basis} basis, 3K = {spec.n_coefficients})"),
            (
                "boxes",
                (
                    f"original {d.original_box} px at {d.original_pixel_size:.4g} Å/px; processing {d.box} px "
                    f"at {d.pixel_size:.4g} Å/px"
                ),
            ),
            ("RMS deformation", f"median {np.median(rms_a):.2f} Å, 95th percentile {np.percentile(rms_a, 95):.2f} Å"),
            *(
                (
                    f"{name} map",
                    f"{summary[name]['fsc_0.143']:.2f} Å (FSC 0.143), {summary[name]['fsc_0.5']:.2f} Å (FSC 0.5)",
                )
                for name in ("corrected", "uncorrected")
            ),
            (
                "clusters",
                ", ".join(f"{j + 1}: {int(s)}" for j, s in enumerate(np.bincount(land.labels, minlength=land.k))),
            ),
            ("refinement rounds", f"{len(c.rounds)} (the maps, fields and landscape above are the final round's)"),
            ("gold standard", GOLD_STANDARD_NOTES.get(c.inputs.gold_standard, c.inputs.gold_standard)),
        ],
        columns=["item", "value"],
    )
    if c.spearman is not None:
        overview.loc[len(overview)] = ["|Spearman| PC1 vs true t", f"{c.spearman:.3f}"]
    return ("summary", "Summary", _table(overview, left=("item", "value")))


def _landscape(c: ReportContent) -> Section:
    """PCA and UMAP figures, the variance table, the cluster table and links."""
    esc, out, pca, labels, rms_a = html.escape, c.out, c.landscape.pca, c.landscape.labels, c.landscape.rms_a
    var = pd.DataFrame({"component": [f"PC{j + 1}" for j in range(min(6, len(pca.explained_variance)))]})
    var["σ (px)"] = pca.sigmas[: len(var)]
    var["variance fraction"] = pca.explained_variance_ratio[: len(var)]
    var["cumulative"] = np.cumsum(pca.explained_variance_ratio)[: len(var)]
    rows = []
    for j, files in enumerate(c.clusters.files):
        sel = labels == j
        links = " ".join(_link(p, out, f".{kind}") for kind, p in files.items())
        rows.append(
            {
                "cluster": j + 1,
                "particles": int(sel.sum()),
                "fraction": sel.mean(),
                "mean RMS deformation (Å)": float(rms_a[sel].mean()),
                "files": links,
            }
        )
    clusters_table = pd.DataFrame(rows)
    umap_note = c.landscape.umap_note
    land = (
        _img(
            c.pngs["landscape_pca"],
            "PCA landscape",
            "PCA of the per-particle Zernike3D coefficients (px of the original box), coloured by "
            "k-means cluster and by RMS deformation over the mask. Black dots: the motion series "
            "(−2σ…+2σ). SVG: " + _link(c.paths["landscape_pca_svg"], out) + ".",
        )
        + _table(var, formats={"σ (px)": ".3g", "variance fraction": ".1%", "cumulative": ".1%"})
        + _img(
            c.pngs["landscape_umap"],
            "UMAP landscape",
            (esc(umap_note) if umap_note else "UMAP of the coefficients, same colours.")
            + " SVG: "
            + _link(c.paths["landscape_umap_svg"], out)
            + ".",
        )
        + "<p><b>Choose particles</b> in the interactive landscape, "
        + _link(c.paths["explorer"], out)
        + " (pan, zoom, lasso or box on PCA or UMAP; it saves <code>selection.txt</code>, which the "
        "config key <code>select.file</code> turns into a RELION STAR and a cryoSPARC .cs).</p>"
        + "<h3>Clusters</h3><p>k-means on the coefficients (numbered by increasing mean PC1 score). "
        "Each STAR holds the refine STAR's rows of one cluster with every input column, ready "
        "for a RELION refinement, and each .cs the same particles for cryoSPARC; each map is the "
        "reference deformed by the cluster's mean field.</p>"
        + _table(
            clusters_table,
            left=("files",),
            raw_html=("files",),
            formats={"fraction": ".1%", "mean RMS deformation (Å)": ".2f"},
        )
        + f"<p>ChimeraX: {_link(c.paths['clusters_cxc'], out)}; per-particle table: "
        f"{_link(c.paths['landscape'], out)}.</p>"
    )
    return ("landscape", "Conformational landscape", land)


def _motions(c: ReportContent) -> Section:
    """Make the motion section: the figure and a table of the series' files (or why there are none)."""
    esc, out = html.escape, c.out
    if c.series:
        rows = []
        for m in c.series:
            cxc, s, map_names, model_names = m.script, m.sigmas, m.map_names, m.model_names
            rows.append(
                {
                    "motion": m.name,
                    "steps": len(s),
                    "range": f"{s[0]:+g}σ … {s[-1]:+g}σ",
                    "ChimeraX movie": _link(cxc, out),
                    "maps": f"{_link(cxc.parent / map_names[0], out, map_names[0])} … {esc(map_names[-1])}",
                    "models": (
                        f"{_link(cxc.parent / model_names[0], out, model_names[0])} … {esc(model_names[-1])}"
                        if model_names
                        else "no model given"
                    ),
                }
            )
        motion_html = (
            _img(c.pngs["motions"], "motion series", "The reference deformed along PC1 and PC2 (projections along z).")
            + _table(
                pd.DataFrame(rows),
                left=("motion", "ChimeraX movie", "maps", "models"),
                raw_html=("ChimeraX movie", "maps", "models"),
            )
            + "<p>Open a <code>.cxc</code> in ChimeraX to play the series as a movie.</p>"
        )
    else:
        motion_html = '<p class="note">No motion series: the coefficients have no variance.</p>'
    if c.inputs.model is None:
        motion_html += '<p class="note">No atomic model was given (config <code>model</code>): no model series.</p>'
    if "model_geometry" in c.paths:
        geometry = pd.read_csv(c.paths["model_geometry"], sep="\t")
        motion_html += (
            "<h3>Geometry of the deformed models</h3><p>Per model (clusters and motion series): RMS change "
            "of the bond lengths and of the Cα–Cα distances of consecutive residues against the model "
            "as given, and clashes (heavy atoms more than two bonds apart closer than 2.2 Å; the model "
            "as given has <code>clashes_reference</code>). Table: "
            + _link(c.paths["model_geometry"], c.out)
            + ".</p>"
            + _table(geometry, left=("model",), formats={"bond_rmsd_A": ".3f", "ca_rmsd_A": ".3f", "clashes": ".0f"})
        )
    return ("motions", "Motions", motion_html)


def _deformation(c: ReportContent) -> Section:
    """Make the mean deformation section (its figure)."""
    return (
        "deformation",
        "Mean deformation",
        _img(
            c.pngs["deformation"],
            "mean deformation magnitude",
            "Mean |d| over particles at every mask voxel (Å), central slices: "
            + _link(c.paths["mean_deformation"], c.out)
            + ".",
        ),
    )


def _reconstruction(c: ReportContent) -> Section:
    """FSC figure and table, central slices."""
    fsc_rows = c.reconstruction.fsc[["shell", "resolution", "fsc_corrected", "fsc_uncorrected"]].rename(
        columns={"resolution": "resolution (Å)", "fsc_corrected": "FSC corrected", "fsc_uncorrected": "FSC uncorrected"}
    )
    recon = (
        _img(
            c.pngs["fsc"],
            "FSC curves",
            "Half-map FSC of the ZART reconstructions with (corrected) and without (uncorrected) the "
            "deformation fields. SVG: " + _link(c.paths["fsc_svg"], c.out) + ".",
        )
        + "<details><summary>FSC table</summary>"
        + _table(fsc_rows, formats={"resolution (Å)": ".2f", "FSC corrected": ".3f", "FSC uncorrected": ".3f"})
        + "</details>"
        + _comparison(c)
        + _img(c.pngs["slices"], "central slices", "Central slices of the corrected and uncorrected maps.")
    )
    return ("reconstruction", "Reconstruction", recon)


def _comparison(c: ReportContent) -> str:
    """Return the table comparing this run's corrected-map FSC with another run's ("" without one)."""
    table = c.reconstruction.comparison
    if table is None:
        return ""
    gold = c.inputs.gold_standard
    return (
        f"<p>This run (gold standard: {html.escape(gold)}) beside {html.escape(str(table.index[1]))} "
        f"({html.escape(str(c.inputs.compare_fsc))}), corrected maps. With shared networks the fields "
        "of one half set are learnt from both, which can make the two half maps agree more than "
        "their content warrants; with independent half sets no information crosses them. "
        "Difference: this run − the other.</p>"
        + _table(
            table.reset_index(),
            left=["corrected map"],
            formats={"FSC area": ".4f", "0.143 (Å)": ".2f", "0.5 (Å)": ".2f"},
        )
    )


def _rounds(c: ReportContent) -> Section:
    """Make the rounds section: the gold-standard mode, the table of rounds and (with several) their landscapes."""
    gold, rounds_table = c.inputs.gold_standard, c.rounds
    rounds_html = (
        f"<p>Gold standard: {html.escape(GOLD_STANDARD_NOTES.get(gold, gold))}. Round 1 "
        "refines against the consensus reference; each later round fine-tunes the previous round's "
        "network against the previous round's corrected map (and a mask made from it).</p>"
        + _table(
            rounds_table.astype(object).where(rounds_table.notna(), "–"),
            formats=dict.fromkeys(rounds_table.columns, ".2f") | {"round": ".0f", "wall time (s)": ".1f"},
        )
        + "<p>Half-map FSC resolutions of each round's ZART maps; wall time: the round's jobs "
        "summed from the Snakemake benchmark files (– when missing). Table: "
        + _link(c.paths["rounds"], c.out)
        + ".</p>"
    )
    if "rounds" in c.pngs:
        rounds_html += _img(
            c.pngs["rounds"],
            "landscape per round",
            "PC1/PC2 of each round's refined coefficients, every particle coloured by its final PC1 score.",
        )
    return ("rounds", "Refinement rounds", rounds_html)


def _timings(c: ReportContent) -> Section:
    """Make the timing section: the per-stage table (or a note that there is none)."""
    if len(c.timings):
        timing_html = _table(
            c.timings.rename(columns={"wall_s": "wall (s)", "cpu_s": "CPU (s)", "max_rss_mb": "max RSS (MB)"}),
            left=("stage",),
            formats={"wall (s)": ".1f", "CPU (s)": ".1f", "max RSS (MB)": ".0f"},
        )
        timing_html += (
            "<p>From the Snakemake benchmark files (wall time summed over a rule's jobs; the "
            "report's own time is not yet recorded when it is written).</p>"
        )
    else:
        timing_html = '<p class="note">No benchmark files found.</p>'
    return ("timings", "Timings", timing_html)


def _parameters(c: ReportContent) -> Section:
    """Make the parameters section: the run's configuration as JSON."""
    run_config = c.inputs.run_config
    config_text = json.dumps(run_config, indent=2, default=str) if run_config is not None else "(not given)"
    return ("parameters", "Run parameters", f"<pre>{html.escape(config_text)}</pre>")


def _outputs(c: ReportContent) -> Section:
    """Links to every output, sorted by path."""
    listed = sorted({p for key, p in c.paths.items() if key != "html"}, key=lambda p: p.relative_to(c.out).as_posix())
    items = "".join(f"<li>{_link(p, c.out)}</li>" for p in listed)
    return ("outputs", "Outputs", f"<ul>{items}</ul>")


#: The page's sections, in page order.
SECTIONS: tuple[Callable[[ReportContent], Section], ...] = (
    _summary,
    _landscape,
    _motions,
    _deformation,
    _reconstruction,
    _rounds,
    _timings,
    _parameters,
    _outputs,
)


def report_sections(content: ReportContent) -> list[Section]:
    """Return the report's sections, ``(id, heading, body html)`` in page order.

    Parameters
    ----------
    content
        What the page shows.
    """
    return [section(content) for section in SECTIONS]


def render_report(content: ReportContent) -> str:
    """Render the report's page (:func:`render_html` of :func:`report_sections`), titled with the run.

    Parameters
    ----------
    content
        What the page shows.
    """
    run_name = content.inputs.run_name
    return render_html(report_sections(content), title=f"z3 report: run {run_name}" if run_name else "z3 report")
