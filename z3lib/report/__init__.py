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

The package's modules, each importing only those above it:

``records``
    The frozen records the steps pass on: :class:`ReportInputs` (paths and settings),
    :class:`ReportData` (loaded particles, fields and maps), :class:`Landscape` (PCA, UMAP,
    clusters), :class:`ClusterSet`, :class:`MotionSeries`, :class:`Reconstruction`,
    :class:`RefinementRounds`.
``figures``
    The matplotlib figures and their PNG/SVG files.
``chimerax``
    :func:`chimerax_series_script`.
``timings``
    :func:`read_stage_timings`, :func:`read_round_timings`, :func:`summarise_rounds`.
``page``
    The HTML page: :class:`ReportContent`, one function per section, :func:`render_html`.
``steps``
    :func:`make_report` and :func:`write_report`, the sequence of named steps (load, landscape,
    clusters, motions, exports, figures, rounds, page).
"""

from __future__ import annotations

from z3lib.report.chimerax import chimerax_series_script
from z3lib.report.figures import (
    plot_fsc,
    plot_landscape,
    plot_message,
    plot_motion_series,
    plot_rounds,
    plot_slices,
)
from z3lib.report.page import GOLD_STANDARD_NOTES, ReportContent, render_html
from z3lib.report.records import (
    ClusterSet,
    Landscape,
    MotionSeries,
    Reconstruction,
    RefinementRounds,
    ReportData,
    ReportInputs,
)
from z3lib.report.steps import make_report, write_report
from z3lib.report.timings import (
    STAGE_ORDER,
    read_round_timings,
    read_stage_timings,
    summarise_rounds,
)

__all__ = [
    "GOLD_STANDARD_NOTES",
    "STAGE_ORDER",
    "ClusterSet",
    "Landscape",
    "MotionSeries",
    "Reconstruction",
    "RefinementRounds",
    "ReportContent",
    "ReportData",
    "ReportInputs",
    "chimerax_series_script",
    "make_report",
    "plot_fsc",
    "plot_landscape",
    "plot_message",
    "plot_motion_series",
    "plot_rounds",
    "plot_slices",
    "read_round_timings",
    "read_stage_timings",
    "render_html",
    "summarise_rounds",
    "write_report",
]
