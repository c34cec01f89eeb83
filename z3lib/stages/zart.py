"""Stage ``zart``: gold-standard corrected and uncorrected ZART reconstructions with their FSCs.

:func:`z3lib.zart.reconstruct_zart` runs on each half set, with and without the fields.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from z3lib.field_scale import choose_field_scale, frame_fields, pull_back
from z3lib.io import ImageStack, Particles, release_memory
from z3lib.io.coefficients import FieldRows
from z3lib.zart import (
    ZartConfig,
    get_backend,
    half_sets,
    masked_fsc,
    reconstruct_zart,
    soft_support,
    values_to_volume,
)
from z3lib.zernike import ZernikeSpec


def zart(
    particles: str | Path,
    points: str | Path | Sequence[str | Path],
    coefficients: str | Path | None,
    out_dir: str | Path,
    *,
    zernike: Mapping[str, Any],
    config: ZartConfig,
    backend: str = "auto",
    poses: str | Path | None = None,
    pixel_size: float | None = None,
    image_root: str | Path | None = None,
    log: logging.Logger | None = None,
) -> dict[str, Path]:
    """Gold-standard corrected and uncorrected ZART reconstructions with FSCs.

    Writes ``corrected.mrc`` (half-map average low-passed at its FSC = 0.143 resolution; the
    FSC is computed inside a soft version of the mask, see :func:`z3lib.zart.soft_support`),
    ``corrected_half1.mrc``, ``corrected_half2.mrc``, the same three for ``uncorrected`` (zero
    fields: the same code), and ``fsc.tsv`` (both FSC curves) in ``out_dir``.

    Parameters
    ----------
    particles
        the preprocess stage's STAR.
    points
        the point cloud whose voxels are reconstructed (the preprocess stage's, or a refinement
        round's), or one per gold-standard half (independent halves: half h is reconstructed on
        its own reference's mask); the FSC is then computed inside the union of both supports.
        A cloud on a sub-grid (``step`` > 1 in the file, ``preprocess.points_step``) gives maps
        on the full grid (see :func:`z3lib.zart.values_to_volume`), low-passed at that sub-grid's Nyquist
        ``2 · step · pixel size`` Å: the FSC and the resolution never exceed it.
    coefficients
        ``(n, 3K)`` fields in px of the original box (refine or predict output).
    out_dir
        Folder of the maps and ``fsc.tsv``.
    zernike
        the config's ``zernike`` section (``L1``, ``L2``, ``basis``): the basis of ``coefficients``.
    poses
        the STAR holding the particles' latest poses and CTF (the refine stage's
        ``particles.star`` of the same round: the same particles in the same order, original box,
        shifts in Å): its angles, shifts (converted to px of the processing box) and defocus are
        reconstructed with instead of those of ``particles`` (see :func:`z3lib.io.apply_poses`,
        which refuses a STAR whose rows do not correspond). None: the poses of ``particles``.
    pixel_size, image_root
        the overrides the preprocess stage used for the original particles, to read ``poses``.
    config, backend, log
        ZART settings, back end (:func:`z3lib.zart.get_backend`) and logger (default this module's).
    """
    logger = log or logging.getLogger(__name__)
    be = get_backend(backend, logger)
    parts, clouds, half_pts, step = _zart_inputs(
        particles, points, poses=poses, pixel_size=pixel_size, image_root=image_root, log=logger
    )
    box, orig = int(clouds[0]["box"]), int(clouds[0]["original_box"])
    apix = float(clouds[0]["pixel_size"])
    spec = ZernikeSpec.from_config(zernike, orig)
    h1, h2 = half_sets(parts.table["random_subset"].to_numpy(), config.seed)
    coeffs, half_z = _fields(coefficients, parts, particles, half_pts, spec, box, (h1, h2), config.frame)
    release_memory()  # the parse's and the frames' scratch go back before the maps
    voxels = " / ".join(str(len(c["points"])) for c in clouds)
    what = (len(parts), len(h1), len(h2), box, voxels, config.iterations, config.batch_size)
    logger.info("ZART: %d particles (halves %d + %d), box %d, %s mask voxels, %d iterations, batch %d", *what)
    stack = parts.images()
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    curves = {}
    fsc_mask = soft_support(np.unique(np.concatenate(half_pts), axis=0), box, step=step)
    coeffs, scale_table = _scaled_fields(
        be, coeffs, half_pts, half_z, stack, parts, (h1, h2), box, apix, config, fsc_mask, step, logger
    )
    for name, field_coeffs in (("corrected", coeffs), ("uncorrected", None)):
        halves = _half_maps(
            be,
            name,
            half_pts,
            half_z,
            field_coeffs,
            stack,
            parts,
            (h1, h2),
            box,
            apix,
            step,
            config,
            out,
            paths,
            logger,
        )
        fsc = masked_fsc(halves[0], halves[1], fsc_mask, apix, step=step)
        curves[name] = fsc
        paths[name] = _write_average(out / f"{name}.mrc", name, halves, fsc, apix, logger)
    _write_tables(out, curves, scale_table, paths)
    stack.close()
    return paths


def _scaled_fields(
    be: Any,
    coeffs: FieldRows | None,
    half_pts: list[np.ndarray],
    half_z: list[np.ndarray | None],
    stack: Any,
    parts: Particles,
    halves: tuple[np.ndarray, np.ndarray],
    box: int,
    apix: float,
    config: ZartConfig,
    fsc_mask: np.ndarray,
    step: int,
    logger: logging.Logger,
) -> tuple[FieldRows | None, pd.DataFrame | None]:
    """Return the fields centred on ``config.frame`` and scaled by ``config.field_scale``, and the scale table.

    ``"auto"`` cross-validates the scale (:func:`z3lib.field_scale.choose_field_scale`); a number must be
    in [0, 1]. A scale of 0 gives no fields (None). Without fields: ``(None, None)``.
    """
    if coeffs is None:
        return None, None
    scale_table = None
    if config.field_scale == "auto":
        zs = [z for z in half_z if z is not None]
        scale, scale_table = choose_field_scale(
            be, half_pts, zs, coeffs, stack, parts.table, halves, box, apix, config, fsc_mask, step=step, log=logger
        )
    else:
        scale = float(config.field_scale)
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"zart.field_scale must be 'auto' or a number in [0, 1], got {config.field_scale!r}")
    if scale_table is None:
        scale_table = pd.DataFrame({"scale": [scale]})
    scale_table["chosen"] = scale_table["scale"] == scale
    return (coeffs.scaled(scale) if scale > 0 else None), scale_table


def _write_tables(
    out: Path, curves: dict[str, pd.DataFrame], scale_table: pd.DataFrame | None, paths: dict[str, Path]
) -> None:
    """Write ``fsc.tsv`` (both FSC curves) and ``field_scale.tsv`` into ``out``; add them to ``paths``."""
    from z3lib.io import write_table

    table = curves["corrected"][["shell", "frequency", "resolution"]].copy()
    table["fsc_corrected"] = curves["corrected"]["fsc"]
    table["fsc_uncorrected"] = curves["uncorrected"]["fsc"]
    paths["fsc"] = out / "fsc.tsv"
    write_table(paths["fsc"], table)
    if scale_table is not None:
        paths["field_scale"] = out / "field_scale.tsv"
        write_table(paths["field_scale"], scale_table)


def _zart_inputs(
    particles: str | Path,
    points: str | Path | Sequence[str | Path],
    *,
    poses: str | Path | None,
    pixel_size: float | None,
    image_root: str | Path | None,
    log: logging.Logger,
) -> tuple[Particles, list[dict[str, Any]], list[np.ndarray], int]:
    """Read the particles (at their latest ``poses``), the point cloud(s), the halves' points and step.

    Each half's points are ``(N_h, 3)`` px; the step is the clouds' sub-grid step. All are checked
    against each other.
    """
    from z3lib.io import apply_poses, read_npz, read_particles

    parts = read_particles(particles)
    if poses is not None:
        parts = apply_poses(parts, read_particles(poses, pixel_size=pixel_size, image_root=image_root))
        log.info("poses and CTF of the %d particles from %s", len(parts), poses)
    # ZART writes no STAR: the particle block as read (every column, text included) is not kept
    parts = dataclasses.replace(parts, raw=parts.raw.iloc[:0])
    point_paths = [points] if isinstance(points, (str, Path)) else list(points)
    if len(point_paths) not in (1, 2):
        raise ValueError(f"ZART needs one point cloud, or one per half set; got {point_paths}")
    clouds = [read_npz(path) for path in point_paths]
    cloud = clouds[0]
    box, orig = int(cloud["box"]), int(cloud["original_box"])
    step = int(cloud["step"]) if "step" in cloud else 1
    if any(int(c["box"]) != box or int(c["original_box"]) != orig for c in clouds):
        raise ValueError(f"the point clouds {point_paths} were made for different boxes")
    if any((int(c["step"]) if "step" in c else 1) != step for c in clouds):
        raise ValueError(f"the point clouds {point_paths} were made with different `preprocess.points_step`")
    half_pts = [np.asarray(clouds[min(h, len(clouds)) - 1]["points"], dtype=np.float64) for h in (1, 2)]
    return parts, clouds, half_pts, step


def _fields(
    coefficients: str | Path | None,
    parts: Particles,
    particles: str | Path,
    half_pts: list[np.ndarray],
    spec: ZernikeSpec,
    box: int,
    halves: tuple[np.ndarray, np.ndarray],
    frame: str,
) -> tuple[FieldRows | None, list[np.ndarray | None]]:
    """Read the fields and evaluate each half's basis on the processing box.

    The fields ``(n, 3K)`` come back in px of the processing box ``box`` (``spec`` is their basis
    on the original box), centred on their half set's frame field (``frame``,
    :func:`z3lib.field_scale.frame_fields`) and read from the file a batch at a time
    (:class:`~z3lib.io.coefficients.FieldRows`); each half's basis values ``(N_h, K)`` at its points pulled
    back through its frame field (:func:`z3lib.field_scale.pull_back`). None (and no basis)
    without ``coefficients``.
    """
    from z3lib.io import CoefficientFile

    half_z: list[np.ndarray | None] = [None, None]
    if coefficients is None:
        return None, half_z
    source = CoefficientFile(coefficients)
    spec.check(source, str(coefficients))
    processing = spec.rescaled(box)
    if source.shape[0] != len(parts):
        raise ValueError(f"{coefficients} has {source.shape[0]} rows but {particles} has {len(parts)} particles")
    # read a batch of rows at a time, converted to px of the processing box: never all in memory
    fields = FieldRows(source, lambda c: spec.convert(c, processing))
    frames = frame_fields(fields, halves, frame)
    half_z = [
        processing.evaluate(pull_back(p, processing, c)).astype(np.float32)
        for p, c in zip(half_pts, frames, strict=True)
    ]
    return FieldRows(fields.source, fields.convert, halves=halves, frames=frames), half_z


def _half_maps(
    backend: Any,
    name: str,
    half_pts: list[np.ndarray],
    half_z: list[np.ndarray | None],
    coefficients: FieldRows | None,
    stack: ImageStack,
    parts: Particles,
    halves: tuple[np.ndarray, np.ndarray],
    box: int,
    apix: float,
    step: int,
    config: ZartConfig,
    out: Path,
    paths: dict[str, Path],
    log: logging.Logger,
) -> list[np.ndarray]:
    """Reconstruct and write ``{name}_half1.mrc`` and ``{name}_half2.mrc``; return the two half maps.

    Their paths go into ``paths``; the maps are ``(box, box, box)``.
    """
    from z3lib.analysis import lowpass_filter
    from z3lib.io import write_map

    maps = []
    for h, rows in enumerate(halves, start=1):
        pts, z = half_pts[h - 1], half_z[h - 1]
        vals, stats = reconstruct_zart(
            backend,
            pts,
            z,
            coefficients,
            stack,
            parts.table,
            rows,
            box,
            apix,
            config,
            log=log,
            label=f" {name} half {h}",
        )
        log.info("%s half %d: %.0f images/s", name, h, stats["images_per_s"])
        half = values_to_volume(vals, pts, box, step=step)
        if step > 1:  # a sub-grid of spacing `step` holds nothing beyond its own Nyquist
            half = lowpass_filter(half, apix, 2.0 * step * apix)
        maps.append(half)
        paths[f"{name}_half{h}"] = out / f"{name}_half{h}.mrc"
        write_map(paths[f"{name}_half{h}"], maps[-1], apix)
    return maps


def _write_average(
    path: Path, name: str, halves: list[np.ndarray], fsc: pd.DataFrame, apix: float, log: logging.Logger
) -> Path:
    """Write the half maps' average low-passed at their FSC = 0.143 resolution to ``path``."""
    from z3lib.analysis import lowpass_filter, resolution_at
    from z3lib.io import write_map

    res = resolution_at(fsc, 0.143)
    log.info("%s: half-map FSC resolution %.2f Å (0.143), %.2f Å (0.5)", name, res, resolution_at(fsc, 0.5))
    write_map(path, lowpass_filter(0.5 * (halves[0] + halves[1]), apix, res), apix)
    return path
