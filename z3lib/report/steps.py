"""The report as a sequence of named steps: :func:`make_report` → :func:`write_report`.

Each step reads or computes one record (:mod:`z3lib.report.records`) and writes its files;
:func:`write_report` calls them in order and collects the paths written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from z3lib import analysis as an
from z3lib import zernike as zk
from z3lib.atoms import model_geometry_table
from z3lib.conventions import box_center
from z3lib.io import (
    ZERNIKE_BLOCK,
    AtomicModel,
    read_coefficients,
    read_map,
    read_model,
    read_npz,
    read_particles,
    read_star_blocks,
    read_table,
    write_cs,
    write_model_pdb,
    write_particles_star,
    write_table,
    write_text,
    write_xmipp_particles,
)
from z3lib.report.chimerax import chimerax_series_script
from z3lib.report.explorer import explorer_html
from z3lib.report.figures import (
    plot_fsc,
    plot_landscape,
    plot_message,
    plot_motion_series,
    plot_rounds,
    plot_slices,
)
from z3lib.report.figures import save_figure as _save
from z3lib.report.page import ReportContent, render_report
from z3lib.report.records import (
    ClusterSet,
    Landscape,
    MotionSeries,
    Reconstruction,
    RefinementRounds,
    ReportData,
    ReportInputs,
)
from z3lib.report.timings import compare_fsc, read_round_timings, read_stage_timings, summarise_rounds

__all__ = ["make_report", "write_report"]

#: The report's logger (the name it had before the report became a package).
_LOG = logging.getLogger("z3lib.report")
_BOTH = ("png", "svg")


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
    zernike: Mapping[str, Any],
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
    compare_fsc: str | Path | None = None,
    source_particles: str | Path | None = None,
    log: logging.Logger | None = None,
) -> dict[str, Path]:
    """Write the report of one run (see :mod:`z3lib.report` for every file).

    The parameters are the fields of :class:`z3lib.report.records.ReportInputs`, documented
    there, and ``log``, the logger of the progress messages (default: ``z3lib.report``).

    Returns
    -------
    name → path of every file written.
    """
    inputs = ReportInputs(
        out_dir=Path(out_dir),
        particles=particles,
        coefficients=coefficients,
        points=points,
        reference=reference,
        mask=mask,
        corrected=corrected,
        uncorrected=uncorrected,
        fsc=fsc,
        zernike=dict(zernike),
        clusters=clusters,
        motion_steps=motion_steps,
        use_umap=use_umap,
        model=model,
        model_origin=model_origin,
        ground_truth=ground_truth,
        benchmarks=benchmarks,
        run_config=run_config,
        run_name=run_name,
        seed=seed,
        pixel_size=pixel_size,
        image_root=image_root,
        round_fsc=tuple(round_fsc),
        round_coefficients=tuple(round_coefficients),
        gold_standard=gold_standard,
        compare_fsc=compare_fsc,
        source_particles=source_particles,
    )
    return write_report(inputs, log)


def write_report(inputs: ReportInputs, log: logging.Logger | None = None) -> dict[str, Path]:
    """Write the report of one run, step by step (see :mod:`z3lib.report` for every file).

    Parameters
    ----------
    inputs
        The run's files and the report's settings.
    log
        Logger of the progress messages (default: ``z3lib.report``).

    Returns
    -------
    name → path of every file written, in writing order.
    """
    logger = log or _LOG
    t0 = time.perf_counter()
    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(inputs, logger)
    landscape = compute_landscape(inputs, data, logger)
    paths = {"landscape": write_landscape_table(out / "landscape.tsv", landscape)}
    paths["explorer"] = out / "landscape.html"
    write_text(paths["explorer"], explorer_html(read_table(paths["landscape"]), run_name=inputs.run_name))
    atomic = read_model(inputs.model) if inputs.model is not None else None
    clusters = write_clusters(out / "clusters", inputs, data, landscape, atomic, logger)
    paths.update(clusters.written)
    series = [write_motion_series(out / "motion", inputs, data, landscape, atomic, comp, logger) for comp in (0, 1)]
    for motion in series:
        paths.update(motion.written)
    if atomic is not None:  # the deformed models' covalent geometry
        models = {p.stem: p for p in paths.values() if p.suffix == ".pdb"}
        paths["model_geometry"] = out / "model_geometry.tsv"
        write_table(paths["model_geometry"], model_geometry_table(atomic, models))
    _remove_stale(out / "motion", "motion_pc*_*", paths.values(), logger)
    _remove_stale(out / "clusters", "cluster_*", paths.values(), logger)
    mean_def, exports = write_exports(out, data, landscape, logger)
    paths.update(exports)
    pngs, reconstruction = draw_figures(out, inputs, data, landscape, series, mean_def, paths)
    rounds = summarise_refinement_rounds(inputs, data)
    paths["rounds"] = out / "rounds.tsv"
    write_table(paths["rounds"], rounds.table)
    if len(rounds.coefficients) > 1:
        pngs["rounds"] = _save(
            plot_rounds(round_landscapes(rounds, landscape), landscape.pca.scores[:, 0]), out, "rounds", ("png",), paths
        )
    timings = read_stage_timings(inputs.benchmarks)
    content = ReportContent(
        out=out,
        inputs=inputs,
        data=data,
        landscape=landscape,
        clusters=clusters,
        series=series,
        reconstruction=reconstruction,
        rounds=rounds.table,
        timings=timings,
        spearman=_spearman(landscape),
        pngs=pngs,
        paths=dict(paths),
    )
    paths["html"] = out / "report.html"
    write_text(paths["html"], render_report(content))
    logger.info("report written in %.1f s: %s", time.perf_counter() - t0, paths["html"])
    return paths


# ==============================================================================================
# Steps
# ==============================================================================================
def load_data(inputs: ReportInputs, logger: logging.Logger) -> ReportData:
    """Read the particles, coefficients, point cloud, reference and mask, and check they belong together.

    Parameters
    ----------
    inputs
        The run's files and settings (Zernike3D basis, particle overrides).
    logger
        Where the summary line goes.

    Raises
    ------
    ValueError
        Coefficients of another shape than ``(n, 3K)``, fewer than 2 particles, or a
        ``data_zernike3d`` block that disagrees with the run.
    """
    parts = read_particles(inputs.particles, pixel_size=inputs.pixel_size, image_root=inputs.image_root)
    blocks = read_star_blocks(inputs.particles)
    coeffs = np.asarray(read_coefficients(inputs.coefficients), dtype=np.float64)
    n = len(parts)
    cloud = read_npz(inputs.points)
    box, orig_box = int(cloud["box"]), int(cloud["original_box"])
    apix, orig_apix = float(cloud["pixel_size"]), float(cloud["original_pixel_size"])
    spec = zk.ZernikeSpec.from_config(inputs.zernike, orig_box)
    if coeffs.shape != (n, spec.n_coefficients):
        raise ValueError(
            f"{inputs.coefficients} has shape {coeffs.shape}; {inputs.particles} has {n} particles and "
            f"(L1, L2) = {spec.degrees} needs 3K = {spec.n_coefficients} coefficients each"
        )
    if n < 2:
        raise ValueError(f"{inputs.particles} has {n} particle(s): the landscape needs at least 2")
    _check_zernike_block(blocks, inputs, spec)
    ref = read_map(inputs.reference).data
    msk = read_map(inputs.mask).data
    logger.info("report: %d particles, %s px (processing box %d px)", n, spec, box)
    return ReportData(
        particles=parts,
        coefficients=coeffs,
        points=cloud["points"],
        spec=spec,
        box=box,
        pixel_size=apix,
        original_pixel_size=orig_apix,
        reference=ref,
        mask=msk,
        origin=_map_origin(box, apix, orig_box, orig_apix),
        contour_level=_contour_level(ref, msk),
    )


def compute_landscape(inputs: ReportInputs, data: ReportData, logger: logging.Logger) -> Landscape:
    """PCA, UMAP (when asked for and possible), k-means and the RMS deformation of the particles.

    Parameters
    ----------
    inputs
        Settings (``clusters``, ``use_umap``, ``seed``) and the optional ground truth.
    data
        The loaded particles and fields.
    logger
        Where UMAP's and k's notes go.
    """
    n, coeffs = data.n, data.coefficients
    rms_px = data.deformation_rms(coeffs)
    pca = an.compute_pca(coeffs)
    umap_xy = None
    if inputs.use_umap:
        umap_xy = an.compute_umap(coeffs, seed=inputs.seed, log=logger)
    else:
        logger.info("UMAP disabled in the config (report.umap: false)")
    k = min(int(inputs.clusters), n)
    if k < inputs.clusters:
        logger.warning("%d clusters asked for %d particles: using k = %d", inputs.clusters, n, k)
    labels, _ = an.cluster_kmeans(coeffs, k, seed=inputs.seed, order_by=pca.scores[:, 0])
    umap_note = (
        ""
        if umap_xy is not None
        else (
            "UMAP was not computed: "
            + (
                "it is disabled in the config (report.umap)."
                if not inputs.use_umap
                else f"{n} particles (it needs at least {an.UMAP_MIN_PARTICLES}) or umap-learn "
                "is missing (see the log)."
            )
        )
    )
    return Landscape(
        pca=pca,
        umap=umap_xy,
        umap_note=umap_note,
        labels=labels,
        k=k,
        rms_px=rms_px,
        rms_a=rms_px * data.pixel_size,
        truth=_read_truth(inputs.ground_truth, n, logger),
    )


def write_landscape_table(path: Path, landscape: Landscape) -> Path:
    """Write ``landscape.tsv`` and return ``path``.

    Per particle: its cluster (1…k), PCA scores (up to 10, px), UMAP coordinates, RMS deformation
    (Å) and the true coordinate (when known).

    Parameters
    ----------
    path
        The file to write.
    landscape
        The particles' landscape.
    """
    pca, n = landscape.pca, len(landscape.labels)
    land = pd.DataFrame({"particle": np.arange(n), "cluster": landscape.labels + 1})
    for j in range(min(pca.scores.shape[1], 10)):
        land[f"pc{j + 1}"] = pca.scores[:, j]
    if landscape.umap is not None:
        land["umap1"], land["umap2"] = landscape.umap[:, 0], landscape.umap[:, 1]
    land["deformation_rms_A"] = landscape.rms_a
    if landscape.truth is not None:
        land["true_t"] = landscape.truth
    write_table(path, land)
    return path


def write_clusters(
    folder: Path,
    inputs: ReportInputs,
    data: ReportData,
    landscape: Landscape,
    atomic: AtomicModel | None,
    logger: logging.Logger,
) -> ClusterSet:
    """Write per k-means cluster its particles, its mean-field map (and model), and a ChimeraX script.

    Per cluster: its particles' STAR rows (every input column) and cryoSPARC ``.cs`` (see
    :func:`z3lib.io.write_cs`), the reference deformed by its mean field (and the model), and a
    ChimeraX script of the cluster maps.

    Parameters
    ----------
    folder
        ``clusters/``.
    inputs
        The run's name and the model's origin.
    data
        Particles, fields and reference.
    landscape
        The cluster labels.
    atomic
        The atomic model, or None.
    logger
        Where the cluster sizes go.
    """
    labels, k = landscape.labels, landscape.k
    means = an.cluster_means(data.coefficients, labels, k)
    cluster_maps = data.deform_reference(means)
    parts = data.particles
    source = inputs.source_particles
    cs_source = source if source is not None and Path(source).suffix == ".cs" else None
    all_files: list[dict[str, Path]] = []
    written: dict[str, Path] = {}
    for j in range(k):
        stem = f"cluster_{j + 1:02d}"
        star, cs, mrc = folder / f"{stem}.star", folder / f"{stem}.cs", folder / f"{stem}.mrc"
        rows = np.flatnonzero(labels == j)
        write_particles_star(star, parts, table=parts.table.iloc[rows], zernike=data.spec)
        write_cs(cs, parts.table.iloc[rows], source=cs_source, source_rows=rows if cs_source is not None else None)
        data.write_map(mrc, cluster_maps[j])
        files = {"star": star, "cs": cs, "mrc": mrc}
        if atomic is not None:
            files["pdb"] = folder / f"{stem}.pdb"
            write_model_pdb(files["pdb"], atomic, data.deform_model(atomic, means[j], inputs.model_origin))
        all_files.append(files)
        written.update({f"{stem}_{kind}": path for kind, path in files.items()})
    written["clusters_cxc"] = folder / "clusters.cxc"
    write_text(
        written["clusters_cxc"],
        chimerax_series_script(
            [f["mrc"].name for f in all_files],
            level=data.contour_level,
            play=False,
            models=[f["pdb"].name for f in all_files if "pdb" in f],
            title=f"z3 run {inputs.run_name}: the reference deformed by the mean field of each of {k} k-means clusters",
        ),
    )
    logger.info("clusters: %s particles", ", ".join(str(int(s)) for s in np.bincount(labels, minlength=k)))
    return ClusterSet(files=tuple(all_files), script=written["clusters_cxc"], written=written)


def write_motion_series(
    folder: Path,
    inputs: ReportInputs,
    data: ReportData,
    landscape: Landscape,
    atomic: AtomicModel | None,
    comp: int,
    logger: logging.Logger,
) -> MotionSeries:
    """Write the reference (and model) deformed along one principal component, and a ChimeraX script.

    The series runs from −2σ to +2σ; the script plays it.

    Parameters
    ----------
    folder
        ``motion/``.
    inputs
        ``motion_steps``, the run's name and the model's origin.
    data
        Fields and reference.
    landscape
        The PCA.
    atomic
        The atomic model, or None.
    comp
        0-based component (0: PC1); n ≥ 2 vectors of 3K ≥ 3 entries: PC1 and PC2 always exist.
    logger
        Where a zero-variance warning goes.
    """
    pca, name = landscape.pca, f"pc{comp + 1}"
    if pca.sigmas[comp] <= 0:
        logger.warning("PC%d has zero variance: its motion series repeats the mean map", comp + 1)
    path_c, s = an.component_path(pca, comp, inputs.motion_steps, 2.0)
    maps = data.deform_reference(path_c)
    map_names: list[str] = []
    model_names: list[str] = []
    written: dict[str, Path] = {}
    for i in range(len(s)):
        stem = f"motion_{name}_{i + 1:02d}"
        data.write_map(folder / f"{stem}.mrc", maps[i])
        written[f"{stem}_mrc"] = folder / f"{stem}.mrc"
        map_names.append(f"{stem}.mrc")
        if atomic is not None:
            write_model_pdb(folder / f"{stem}.pdb", atomic, data.deform_model(atomic, path_c[i], inputs.model_origin))
            written[f"{stem}_pdb"] = folder / f"{stem}.pdb"
            model_names.append(f"{stem}.pdb")
    cxc = folder / f"motion_{name}.cxc"
    write_text(
        cxc,
        chimerax_series_script(
            map_names,
            level=data.contour_level,
            models=model_names,
            title=(
                f"z3 run {inputs.run_name}: the reference deformed along PC{comp + 1} "
                f"({pca.explained_variance_ratio[comp]:.0%} of the variance), {s[0]:+g} to {s[-1]:+g} σ"
            ),
        ),
    )
    written[f"motion_{name}_cxc"] = cxc
    xy = np.zeros((len(s), 2))
    xy[:, comp] = s * pca.sigmas[comp]
    return MotionSeries(
        name=name.upper(),
        maps=maps,
        sigmas=s,
        script=cxc,
        map_names=tuple(map_names),
        model_names=tuple(model_names),
        landscape_xy=xy,
        written=written,
    )


def write_exports(
    out: Path, data: ReportData, landscape: Landscape, logger: logging.Logger
) -> tuple[np.ndarray, dict[str, Path]]:
    """Write ``mean_deformation.mrc`` and the Xmipp/Scipion export ``particles.xmd``.

    The export's fields are in Xmipp's basis, refitted with L2 ≤ 4 from another basis.

    Parameters
    ----------
    out
        The report's folder.
    data
        Particles and fields.
    landscape
        The RMS deformation (``sphDeformation``).
    logger
        Where the refit's residual goes.

    Returns
    -------
    The ``(box, box, box)`` mean |d| map (Å) and name → path of the two files.
    """
    spec, box, orig_box = data.spec, data.box, data.original_box
    paths = {"mean_deformation": out / "mean_deformation.mrc"}
    mean_def = an.mean_deformation_map(
        data.processing(data.coefficients), data.mask, data.processing_spec, pixel_size=data.pixel_size
    )
    data.write_map(paths["mean_deformation"], mean_def)
    paths["xmd"] = out / "particles.xmd"
    raw = data.particles.raw
    cost = raw["zernikeCost"].to_numpy(dtype=np.float64) if "zernikeCost" in raw else None
    xmd_spec, xmd_coeffs = spec, data.coefficients
    if spec.basis != "xmipp":  # Xmipp/Scipion read sphCoefficients in their own basis (L2 <= 4)
        xmd_spec = zk.ZernikeSpec(spec.L1, min(spec.L2, zk.XMIPP_MAX_L2), "xmipp", orig_box)
        # the same linear refit in any box unit: fitted on the processing box's points
        xmd_coeffs, residual = zk.refit_basis(
            data.coefficients, data.points, data.processing_spec, xmd_spec.rescaled(box)
        )
        logger.info(
            "particles.xmd: fields refitted from the %s (%d, %d) basis to Xmipp's (%d, %d): %.1f%% "
            "relative RMS residual",
            spec.basis,
            spec.L1,
            spec.L2,
            xmd_spec.L1,
            xmd_spec.L2,
            100 * residual,
        )
    write_xmipp_particles(
        paths["xmd"],
        data.particles.table,
        xmd_coeffs,
        deformation=landscape.rms_px * orig_box / box,
        cost=cost,
        zernike=xmd_spec,
    )
    return mean_def, paths


def draw_figures(
    out: Path,
    inputs: ReportInputs,
    data: ReportData,
    landscape: Landscape,
    series: Sequence[MotionSeries],
    mean_def: np.ndarray,
    paths: dict[str, Path],
) -> tuple[dict[str, bytes], Reconstruction]:
    """Draw and write the landscape, FSC, slice, motion and deformation figures.

    Parameters
    ----------
    out
        The report's folder.
    inputs
        The ZART maps and FSC, and whether UMAP was asked for.
    data
        The number of particles.
    landscape
        PCA, UMAP, clusters, RMS deformation (Å) and ground truth.
    series
        The motion series.
    mean_def
        ``(box, box, box)`` mean |d| map (Å).
    paths
        Updated in place with ``<figure>_<fmt>`` → path of every figure file.

    Returns
    -------
    Figure name → PNG bytes, and the ZART reconstructions read for the figures.
    """
    truth, labels, rms_a = landscape.truth, landscape.labels, landscape.rms_a
    pca_xy, pc_labels = _pc_plane(landscape.pca, data.n)
    pngs: dict[str, bytes] = {}
    pngs["landscape_pca"] = _save(
        plot_landscape(
            pca_xy,
            labels,
            rms_a,
            axis_labels=pc_labels,
            truth=truth,
            paths_xy=[(m.name, m.landscape_xy) for m in series],
            title="Landscape: PCA of the Zernike3D coefficients",
        ),
        out,
        "landscape_pca",
        _BOTH,
        paths,
    )
    if landscape.umap is not None:
        fig = plot_landscape(
            landscape.umap,
            labels,
            rms_a,
            axis_labels=("UMAP 1", "UMAP 2"),
            truth=truth,
            title="Landscape: UMAP of the Zernike3D coefficients",
        )
    else:
        fig = plot_message("Landscape: UMAP", landscape.umap_note)
    pngs["landscape_umap"] = _save(fig, out, "landscape_umap", _BOTH, paths)
    recon = read_reconstruction(inputs)
    other = None
    if recon.compared is not None and recon.comparison is not None:
        other = (str(recon.comparison.index[1]), recon.compared)  # the other run's name, as tabulated
    pngs["fsc"] = _save(plot_fsc(recon.fsc, recon.summary, other), out, "fsc", _BOTH, paths)
    pngs["slices"] = _save(
        plot_slices([("corrected", recon.corrected), ("uncorrected", recon.uncorrected)]),
        out,
        "slices",
        ("png",),
        paths,
    )
    if series:
        pngs["motions"] = _save(
            plot_motion_series([(m.name, m.maps, m.sigmas) for m in series]), out, "motions", ("png",), paths
        )
    pngs["deformation"] = _save(
        plot_slices([("mean |d|", mean_def)], cmap="viridis", colorbar="mean deformation (Å)"),
        out,
        "deformation",
        ("png",),
        paths,
    )
    return pngs, recon


def read_reconstruction(inputs: ReportInputs) -> Reconstruction:
    """Read ``fsc.tsv`` (and its 0.143/0.5 resolutions) and the corrected and uncorrected maps.

    Parameters
    ----------
    inputs
        The ZART stage's files.
    """
    fsc_table = read_table(inputs.fsc)
    summary = {name: an.fsc_summary(fsc_table, f"fsc_{name}") for name in ("corrected", "uncorrected")}
    compared = comparison = None
    if inputs.compare_fsc is not None:
        compared = read_table(inputs.compare_fsc)
        name = compare_name(inputs.compare_fsc)
        comparison = compare_fsc(fsc_table, compared, other_name=name, source=str(inputs.compare_fsc))
    return Reconstruction(
        fsc=fsc_table,
        summary=summary,
        corrected=read_map(inputs.corrected).data,
        uncorrected=read_map(inputs.uncorrected).data,
        compared=compared,
        comparison=comparison,
    )


def compare_name(path: str | Path) -> str:
    """Name another run's ``fsc.tsv`` by its run: ``results/<run>/zart/fsc.tsv`` → ``<run>``.

    A file elsewhere is named by its path.
    """
    p = Path(path)
    if p.name == "fsc.tsv" and p.parent.name == "zart" and p.parent.parent.name:
        return p.parent.parent.name
    return str(p)


def summarise_refinement_rounds(inputs: ReportInputs, data: ReportData) -> RefinementRounds:
    """Read every round's FSC and coefficients and tabulate them (:func:`summarise_rounds`).

    Parameters
    ----------
    inputs
        ``round_fsc`` and ``round_coefficients`` (empty: the final round's only) and the
        benchmark folder (round wall times).
    data
        The final round's coefficients (every round must have their shape) and the point cloud.

    Raises
    ------
    ValueError
        Different numbers of FSC and coefficient files, or coefficients of another shape.
    """
    fsc_paths = [Path(f) for f in inputs.round_fsc] or [Path(inputs.fsc)]
    coefficient_paths = [Path(f) for f in inputs.round_coefficients] or [Path(inputs.coefficients)]
    if len(fsc_paths) != len(coefficient_paths):
        raise ValueError(f"{len(fsc_paths)} rounds of FSC but {len(coefficient_paths)} of coefficients")
    fields = []
    for c_path in coefficient_paths:
        c = np.asarray(read_coefficients(c_path), dtype=np.float64)
        if c.shape != data.coefficients.shape:
            raise ValueError(
                f"{c_path} has shape {c.shape}; the final round's coefficients have {data.coefficients.shape}"
            )
        fields.append(c)
    rms_median = [float(np.median(data.deformation_rms(c))) * data.pixel_size for c in fields]
    table = summarise_rounds(
        [read_table(path) for path in fsc_paths], rms_median, read_round_timings(inputs.benchmarks)
    )
    return RefinementRounds(table=table, coefficients=tuple(fields))


def round_landscapes(rounds: RefinementRounds, landscape: Landscape) -> list[tuple[str, np.ndarray, tuple[str, str]]]:
    """Return per round its title, PC1/PC2 scores of its own PCA and axis labels.

    The scores are ``(n, 2)`` (the final round's are ``landscape``'s), for
    :func:`z3lib.report.figures.plot_rounds`.

    Parameters
    ----------
    rounds
        Every round's coefficients, the final round's last.
    landscape
        The final round's PCA.
    """
    panels = []
    last = len(rounds.coefficients)
    for j, c in enumerate(rounds.coefficients, start=1):
        r_pca = landscape.pca if j == last else an.compute_pca(c)
        xy = np.zeros((len(c), 2))
        xy[:, : min(2, r_pca.scores.shape[1])] = r_pca.scores[:, :2]
        v = r_pca.explained_variance_ratio
        panels.append((f"round {j}", xy, (f"PC1 ({v[0]:.0%})", f"PC2 ({v[1]:.0%})" if len(v) > 1 else "PC2")))
    return panels


# ==============================================================================================
# Helpers
# ==============================================================================================
def _check_zernike_block(blocks: Mapping[str, pd.DataFrame], inputs: ReportInputs, spec: zk.ZernikeSpec) -> None:
    """Raise ``ValueError`` when the STAR's ``data_zernike3d`` block (if any) is not the run's basis ``spec``."""
    if ZERNIKE_BLOCK not in blocks:
        return
    zblock = {str(k): (v.item() if hasattr(v, "item") else v) for k, v in blocks[ZERNIKE_BLOCK].iloc[0].items()}
    try:
        found = zk.ZernikeSpec.from_block(zblock)
    except ValueError as exc:
        raise ValueError(f"{inputs.particles}: its data_zernike3d block is not usable: {exc}") from exc
    if found != spec:
        raise ValueError(f"{inputs.particles}: its data_zernike3d block ({found}) disagrees with this run ({spec})")


def _read_truth(ground_truth: str | Path | None, n: int, logger: logging.Logger) -> np.ndarray | None:
    """Return the ``(n,)`` column ``t`` of ``ground_truth.tsv``, or None.

    None: no file, or one that does not match the ``n`` particles (logged).
    """
    if ground_truth is None:
        return None
    gt = read_table(ground_truth)
    if len(gt) == n and "t" in gt:
        truth: np.ndarray = gt["t"].to_numpy(dtype=np.float64)
        return truth
    logger.warning("%s does not match the particles (%d rows, %d particles): not shown", ground_truth, len(gt), n)
    return None


def _pc_plane(pca: an.PcaResult, n: int) -> tuple[np.ndarray, tuple[str, str]]:
    """``(n, 2)`` PC1/PC2 scores (zeros where a component is missing) and their axis labels."""
    var = pca.explained_variance_ratio
    labels = (f"PC1 ({var[0]:.0%} of variance, px)", f"PC2 ({var[1]:.0%} of variance, px)" if len(var) > 1 else "PC2")
    xy = np.zeros((n, 2))
    xy[:, : min(2, pca.scores.shape[1])] = pca.scores[:, :2]
    return xy, labels


def _spearman(landscape: Landscape) -> float | None:
    """|Spearman| correlation of PC1 with the true motion coordinate, or None without one."""
    if landscape.truth is None:
        return None
    from scipy.stats import spearmanr

    return float(abs(spearmanr(landscape.pca.scores[:, 0], landscape.truth).statistic))


def _map_origin(
    box: int, pixel_size: float, original_box: int, original_pixel_size: float
) -> tuple[float, float, float]:
    """MRC origin (Å) that puts a processing-box map's centre on the original box's centre."""
    shift = box_center(original_box) * original_pixel_size - box_center(box) * pixel_size
    return (shift, shift, shift)


def _remove_stale(folder: Path, pattern: str, written: Iterable[Path], logger: logging.Logger) -> None:
    """Delete files of an earlier run that this run did not write.

    E.g. files of a run with more motion steps or clusters, so that the ChimeraX scripts' globs
    match exactly this run's series.
    """
    keep = {Path(p).resolve() for p in written}
    for path in sorted(folder.glob(pattern)):
        if path.is_file() and path.resolve() not in keep:
            logger.info("removing %s, left by an earlier run", path)
            path.unlink()


def _contour_level(reference: np.ndarray, mask: np.ndarray) -> float:
    """Return a surface level for the series: the median of the reference inside the mask."""
    inside = reference[mask > 0.5]
    return float(np.median(inside)) if inside.size else float(reference.max() / 2)
