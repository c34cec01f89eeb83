"""Stages ``refine_landscape``, ``refine_chunk`` and ``refine``.

The landscape fitted to all particles (:func:`z3lib.population.fit_population`), the
per-particle refinement of one chunk of particles (:func:`z3lib.refine_run.refine_particles`), then
the chunks gathered back in STAR order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from z3lib import zernike as zk
from z3lib.conventions import shift_angstrom_to_pixels, shift_pixels_to_angstrom
from z3lib.decoder import PhysicalDecoder, Roughness
from z3lib.io import FieldRows, Particles
from z3lib.network import CloudExtras, NetworkConfig
from z3lib.refine import Landscape, RefineConfig, make_decoder
from z3lib.refine_run import chunk_rows, refine_particles
from z3lib.training import ParticleBatchSource, stack_identity


def refine_landscape(
    particles: str | Path,
    points: str | Path | Sequence[str | Path],
    prior_coefficients: str | Path,
    out_paths: str | Path | Sequence[str | Path],
    *,
    zernike: Mapping[str, Any],
    config: RefineConfig,
    device: str | torch.device = "cpu",
    independent_halves: bool = False,
    seed: int = 0,
    poses: str | Path | None = None,
    pixel_size: float | None = None,
    image_root: str | Path | None = None,
    roughness: Roughness = NetworkConfig.roughness,
    log: logging.Logger | None = None,
) -> list[Path]:
    """Fit the landscape to all particles (or to each gold-standard half); write each fit.

    With ``independent_halves`` each half is fitted on its own, against its own point cloud. Each
    fit goes to ``out_paths`` (one, or one per half; ``.npz``, atomic,
    :func:`z3lib.population.write_population` plus ``rows``, the particles it covers, ``box`` and
    ``original_box``).

    Arguments as :func:`refine_chunk`; ``config.population_rounds`` alternations.
    """
    from z3lib.population import fit_population, write_population
    from z3lib.zart import half_sets

    logger = log or logging.getLogger(__name__)
    parts, clouds, prior, spec = _refine_inputs(
        particles,
        points,
        prior_coefficients,
        zernike,
        independent_halves=independent_halves,
        poses=poses,
        pixel_size=pixel_size,
        image_root=image_root,
        log=logger,
    )
    outs = [Path(out_paths)] if isinstance(out_paths, (str, Path)) else [Path(p) for p in out_paths]
    source = ParticleBatchSource.from_particles(parts)
    groups = list(half_sets(source.subsets, seed)) if independent_halves else [np.arange(len(parts))]
    if len(outs) != len(groups):
        raise ValueError(f"{len(groups)} landscape(s) to write but {len(outs)} paths given: {outs}")
    for h, (rows, out) in enumerate(zip(groups, outs, strict=True)):
        c = clouds[min(h, len(clouds) - 1)]
        box = int(c["box"])
        if independent_halves:
            logger.info(
                "gold-standard half %d: %d particles, its own reference (%d points)", h + 1, len(rows), len(c["points"])
            )
        decoder = _cloud_decoder(c, spec, device, roughness)
        fit = fit_population(decoder, source.take(rows), prior[rows], config, device=device, seed=seed, log=logger)
        write_population(
            out, fit, rows=np.asarray(rows, dtype=np.int64), box=np.int64(box), original_box=np.int64(c["original_box"])
        )
        logger.info("wrote %s: %d direction(s)", out, len(fit.landscape.directions))
    source.images.close()
    return outs


def _fitted_landscapes(
    paths: Sequence[str | Path], prior: FieldRows, log: logging.Logger
) -> tuple[np.ndarray, list[Landscape]]:
    """Read the population fits of :func:`refine_landscape`.

    Returns the coefficients ``(n, 3K)`` (px of the processing box; ``prior``'s rows replaced by
    each fit's) and the landscapes, in file order.
    """
    from z3lib.io import Z3InputError, read_npz
    from z3lib.population import read_population

    log.info("starting from the population's landscape (%s)", ", ".join(str(p) for p in paths))
    out = prior[np.arange(len(prior))]
    lands = []
    covered = np.zeros(len(prior), dtype=np.int64)
    for path in paths:
        land, coeffs = read_population(path)
        rows = read_npz(path)["rows"]
        if coeffs.shape[1] != prior.shape[1] or len(rows) != len(coeffs) or rows.max(initial=-1) >= len(prior):
            raise Z3InputError(
                f"{path} holds a landscape of other particles or degrees "
                f"({coeffs.shape} for rows up to {rows.max(initial=-1)}; the predictions are "
                f"{prior.shape}): remake it (rule refine_landscape)"
            )
        out[rows] = coeffs
        covered[rows] += 1
        lands.append(land)
    if not np.all(covered == 1):
        raise Z3InputError(
            f"the landscape fits {', '.join(str(p) for p in paths)} cover {int((covered > 0).sum())} "
            f"of {len(prior)} particles ({int((covered > 1).sum())} twice): they belong to other "
            "particles or another gold-standard setting; remake them (rule refine_landscape)"
        )
    return out, lands


def refine_chunk(
    particles: str | Path,
    points: str | Path | Sequence[str | Path],
    prior_coefficients: str | Path,
    out_path: str | Path,
    *,
    chunk: int,
    n_chunks: int,
    zernike: Mapping[str, Any],
    config: RefineConfig,
    device: str | torch.device = "cpu",
    progress_path: str | Path | None = None,
    independent_halves: bool = False,
    seed: int = 0,
    poses: str | Path | None = None,
    pixel_size: float | None = None,
    image_root: str | Path | None = None,
    roughness: Roughness = NetworkConfig.roughness,
    log: logging.Logger | None = None,
    landscapes: Sequence[str | Path] | None = None,
) -> Path:
    """Refine one chunk of particles; write its results to ``out_path`` (``.npz``, atomic).

    Parameters
    ----------
    particles, points
        the preprocess stage's STAR and point cloud (processing box) of the reference; with
        ``independent_halves``, one cloud per gold-standard half (or one for both).
    prior_coefficients
        the predict stage's ``coefficients.npy`` (px of the original box), same row order.
    out_path, chunk, n_chunks
        The results file of chunk ``chunk`` (0-based) of ``n_chunks`` equal shares of the particles.
    zernike, config, device
        the config's ``zernike`` section (the basis of the coefficients), the refinement settings
        and the torch device.
    independent_halves, seed
        refine each gold-standard half (:func:`z3lib.zart.half_sets` with ``seed``, ZART's split)
        on its own reference, landscape and prior: no information crosses the halves.
    progress_path
        partial results (:func:`z3lib.refine_run.refine_particles`; one file per half with
        ``independent_halves``), reused only for the same inputs, settings and library version,
        removed once ``out_path`` is written.
    poses
        the STAR with the particles' latest poses and CTF (the predict stage's ``particles.star``),
        same particles and order, original box (:func:`z3lib.io.apply_poses`); None: those of
        ``particles``.
    roughness
        the measure of ``config.smooth_weight`` and ``config.free_smooth_weight`` (``train.roughness``).
    pixel_size, image_root
        the overrides the preprocess stage used for the original particles, to read ``poses``.
    log
        Logger for progress; default this module's.
    landscapes
        landscape mode: the population fits of :func:`refine_landscape` (one, or one per half);
        the particles start from, and are measured against, their fitted coefficients. None or
        empty: the landscape of the predictions.
    """
    logger = log or logging.getLogger(__name__)
    parts, clouds, predicted, spec = _refine_inputs(
        particles,
        points,
        prior_coefficients,
        zernike,
        independent_halves=independent_halves,
        poses=poses,
        pixel_size=pixel_size,
        image_root=image_root,
        log=logger,
    )
    prior: np.ndarray | FieldRows = predicted
    fitted: list[Landscape] | None = None
    if landscapes and config.mode == "landscape":
        prior, fitted = _fitted_landscapes(landscapes, predicted, logger)
    rows = chunk_rows(len(parts), chunk, n_chunks)
    first, last = (int(rows[0]), int(rows[-1])) if len(rows) else (0, -1)
    logger.info("refining chunk %d/%d: particles %d…%d of %d", chunk + 1, n_chunks, first, last, len(parts))
    source = ParticleBatchSource.from_particles(parts)
    inputs: dict[str, Any] = {"independent_halves": bool(independent_halves), "roughness": roughness}
    arrays, progress_paths = _refine_rows(
        source,
        clouds,
        prior,
        rows,
        _image_identity(parts),
        progress_path,
        halves=independent_halves,
        seed=seed,
        spec=spec,
        config=config,
        device=device,
        roughness=roughness,
        inputs=inputs,
        log=logger,
        landscapes=fitted,
    )
    _write_chunk(out_path, arrays, parts, clouds[0], spec)
    for path in progress_paths:  # the results exist: the partial state is spent
        path.unlink(missing_ok=True)
    source.images.close()
    return Path(out_path)


def _write_chunk(
    out_path: str | Path, arrays: dict[str, np.ndarray], parts: Particles, cloud: dict[str, Any], spec: zk.ZernikeSpec
) -> None:
    """Write a chunk's results ``arrays`` to ``out_path`` (``.npz``, atomic).

    The coefficients are converted from px of the processing box (``spec``'s) to px of the original
    box, and the refined defocus itself (``defocus_u``, ``defocus_v``, Å) is added to the offsets.
    """
    from z3lib.io import write_npz

    box, orig_box = int(cloud["box"]), int(cloud["original_box"])
    arrays["coefficients"] = spec.convert(arrays["coefficients"], spec.rescaled(orig_box))
    # the refined defocus itself: the offsets refer to the starting CTF (that of ``poses``, which in
    # round k >= 2 is already the previous round's refined one), not to the particles as given
    for name in ("defocus_u", "defocus_v"):
        arrays[name] = parts.table[name].to_numpy(np.float64)[arrays["index"]] + arrays["defocus_offset"]
    write_npz(
        out_path,
        box=np.int64(box),
        original_box=np.int64(orig_box),
        pixel_size=np.float64(cloud["pixel_size"]),
        **arrays,
    )


def _refine_inputs(
    particles: str | Path,
    points: str | Path | Sequence[str | Path],
    prior_coefficients: str | Path,
    zernike: Mapping[str, Any],
    *,
    independent_halves: bool,
    poses: str | Path | None,
    pixel_size: float | None,
    image_root: str | Path | None,
    log: logging.Logger,
) -> tuple[Particles, list[dict[str, Any]], FieldRows, zk.ZernikeSpec]:
    """Read the particles (at their latest ``poses``), the point cloud(s), the predicted coefficients.

    The coefficients come back ``(n, 3K)`` in px of the processing box, checked against the particles
    and the basis, as a :class:`~z3lib.io.FieldRows` that reads the rows asked for from the file;
    the basis on the processing box.
    """
    from z3lib.io import CoefficientFile, apply_poses, read_npz, read_particles

    parts = read_particles(particles)
    if poses is not None:
        parts = apply_poses(parts, read_particles(poses, pixel_size=pixel_size, image_root=image_root))
        log.info("starting from the poses and CTF of %s", poses)
    point_paths = [points] if isinstance(points, (str, Path)) else list(points)
    if not independent_halves and len(point_paths) != 1:
        raise ValueError(f"one point cloud is needed, got {len(point_paths)}: {point_paths}")
    if independent_halves and len(point_paths) not in (1, 2):
        raise ValueError(f"independent halves need one point cloud per half (or one for both), got {point_paths}")
    clouds = [read_npz(path) for path in point_paths]
    box, orig_box = int(clouds[0]["box"]), int(clouds[0]["original_box"])
    if any(int(c["box"]) != box or int(c["original_box"]) != orig_box for c in clouds):
        raise ValueError(f"the point clouds {point_paths} were made for different boxes")
    prior_orig = CoefficientFile(prior_coefficients)
    spec_orig = zk.ZernikeSpec.from_config(zernike, orig_box)
    k3 = spec_orig.n_coefficients
    if prior_orig.shape != (len(parts), k3):
        raise ValueError(
            f"{prior_coefficients} holds {prior_orig.shape} coefficients; expected "
            f"({len(parts)}, {k3}) for {len(parts)} particles at (L1, L2) = {spec_orig.degrees}"
        )
    spec = spec_orig.rescaled(box)
    # read from the file a block of rows at a time, in px of the processing box
    return parts, clouds, FieldRows(prior_orig, lambda c: spec_orig.convert(c, spec)), spec


def _image_identity(parts: Particles) -> Callable[[np.ndarray], str]:
    """``rows ↦`` :func:`z3lib.training.stack_identity` of those particles' images."""
    image_paths = parts.table["image_path"].astype(str).to_numpy()
    image_index = parts.table["image_index"].to_numpy(np.int64)

    def image_id(particle_rows: np.ndarray) -> str:
        return stack_identity(image_paths[particle_rows].tolist(), image_index[particle_rows])

    return image_id


def _refine_rows(
    source: ParticleBatchSource,
    clouds: list[dict[str, Any]],
    prior: np.ndarray | FieldRows,
    rows: np.ndarray,
    image_id: Callable[[np.ndarray], str],
    progress_path: str | Path | None,
    *,
    halves: bool,
    seed: int,
    spec: zk.ZernikeSpec,
    config: RefineConfig,
    device: str | torch.device,
    roughness: Roughness,
    inputs: dict[str, Any],
    log: logging.Logger,
    landscapes: list[Landscape] | None = None,
) -> tuple[dict[str, np.ndarray], list[Path]]:
    """Refine the chunk's particles ``rows``: together, or (``halves``) each gold-standard half on its own.

    Each half has its own reference (``clouds[h]``, or one for both), landscape and prior, and its
    own progress journal ``….half{h}.progress``. Returns the results in ``rows`` order and the progress
    files used.
    """
    from z3lib.zart import half_sets

    if halves:
        groups = [
            (h, half_rows, clouds[min(h, len(clouds)) - 1])
            for h, half_rows in enumerate(half_sets(source.subsets, seed), start=1)
        ]
    else:
        groups = [(0, np.arange(len(source)), clouds[0])]
    pieces = []
    progress_paths: list[Path] = []
    for h, group_rows, c in groups:
        local = np.nonzero(np.isin(group_rows, rows))[0]  # this chunk's particles of the group
        group_progress = progress_path
        if h:
            log.info(
                "gold-standard half %d: %d particles of this chunk, against its own reference (%d points)",
                h,
                len(local),
                len(c["points"]),
            )
            group_progress = (
                None
                if progress_path is None
                else Path(progress_path).with_suffix(f".half{h}{Path(progress_path).suffix}")
            )
        if group_progress is not None:
            progress_paths.append(Path(group_progress))
        decoder = _cloud_decoder(c, spec, device, roughness)
        res = refine_particles(
            decoder,
            source.take(group_rows) if h else source,
            prior[group_rows] if h else prior,
            config,
            index=local,
            device=device,
            progress_path=group_progress,
            images=image_id(group_rows[local]),
            inputs={**inputs, "half": h, "seed": int(seed)} if h else inputs,
            log=log,
            landscape=landscapes[max(h, 1) - 1] if landscapes else None,
        ).to_arrays()
        res["index"] = group_rows[res["index"]]
        pieces.append(res)
    order = np.argsort(np.concatenate([piece["index"] for piece in pieces]), kind="stable")
    return {key: np.concatenate([piece[key] for piece in pieces])[order] for key in pieces[0]}, progress_paths


def gather_refined(
    chunk_paths: list[str | Path],
    original_particles: str | Path,
    out_dir: str | Path,
    *,
    zernike: Mapping[str, Any],
    pixel_size: float | None = None,
    image_root: str | Path | None = None,
    log: logging.Logger | None = None,
) -> dict[str, Path]:
    """Gather refined chunks back in STAR order: ``particles.star`` and ``coefficients.npy``.

    The STAR is the user's input STAR (every column, input order) with the refined
    ``zernikeCoefficients`` (px of the original box), ``zernikeCost`` (1 − correlation after
    refinement), ``zernikeCostPrior`` (before), ``zernikeRefineFlag`` (1 = no improvement, prior
    kept), the ``data_zernike3d`` block (``zernike``: the config's section, ``L1``, ``L2`` and
    ``basis``, on the original box), and refined angles, shifts and defocus.
    """
    from z3lib.io import CoefficientFile, open_coefficient_writer, read_npz, read_particles, write_particles_star

    logger = log or logging.getLogger(__name__)
    original = read_particles(original_particles, pixel_size=pixel_size, image_root=image_root)
    n = len(original)
    out = Path(out_dir)
    paths = {"particles": out / "particles.star", "coefficients": out / "coefficients.npy"}
    if not chunk_paths:
        raise ValueError("gather_refined needs at least one refined chunk")
    with np.load(chunk_paths[0], allow_pickle=False) as first:
        spec = zk.ZernikeSpec.from_config(zernike, int(first["original_box"]))
        apix_proc = float(first["pixel_size"])
    small: dict[str, list[np.ndarray]] = {}
    # one chunk in memory at a time: its coefficients go straight to the file, the rest is small
    with open_coefficient_writer(paths["coefficients"], n, spec.n_coefficients) as writer:
        for path in chunk_paths:
            chunk = read_npz(path)
            spec.check(chunk["coefficients"], f"the refined chunk {path}")
            index = chunk["index"]
            if len(index) and (index.min() < 0 or index.max() >= n):
                raise ValueError(f"{path} holds rows up to {index.max()} but {original_particles} has {n} particles")
            writer[index] = chunk.pop("coefficients")
            for key, values in chunk.items():
                if values.ndim and len(values) == len(index):
                    small.setdefault(key, []).append(values)
        index = np.concatenate(small["index"])
        if len(index) != n or not np.array_equal(np.sort(index), np.arange(n)):
            raise ValueError(
                f"the chunks cover {len(index)} rows ({len(np.unique(index))} distinct) but "
                f"{original_particles} has {n} particles: a chunk is missing or repeated"
            )
    order = np.argsort(index)

    def stacked(key: str) -> np.ndarray:
        return np.concatenate(small[key])[order]

    table = original.table.copy()
    angles = stacked("angles")
    for j, name in enumerate(("rot", "tilt", "psi")):
        table[name] = angles[:, j]
    shifts_angstrom = shift_pixels_to_angstrom(stacked("shifts"), apix_proc)
    shifts_px_orig = shift_angstrom_to_pixels(shifts_angstrom, original.pixel_size)
    table["shift_x"], table["shift_y"] = shifts_px_orig[:, 0], shifts_px_orig[:, 1]
    for name in ("defocus_u", "defocus_v"):  # Å; chunks of z3lib <= 0.1.3 hold the offset only
        table[name] = stacked(name) if name in small else table[name].to_numpy() + stacked("defocus_offset")
    flagged = stacked("flagged").astype(bool)
    columns = {
        "zernikeCoefficients": CoefficientFile(paths["coefficients"]),
        "zernikeCost": stacked("cost"),
        "zernikeCostPrior": stacked("cost_prior"),
        "zernikeRefineFlag": flagged.astype(np.int64),
    }
    write_particles_star(paths["particles"], original, columns=columns, zernike=spec, table=table)
    logger.info(
        "gathered %d particles from %d chunks: %d flagged (prior kept), mean cost %.4f → %.4f",
        n,
        len(chunk_paths),
        int(flagged.sum()),
        float(stacked("cost_prior").mean()),
        float(stacked("cost").mean()),
    )
    return paths


def _cloud_decoder(
    cloud: Mapping[str, Any], spec: zk.ZernikeSpec, device: str | torch.device, roughness: Roughness
) -> PhysicalDecoder:
    """Return the refinement's decoder of a point cloud ``.npz`` as read (voxels, or an atomic model's atoms)."""
    return make_decoder(
        cloud["points"],
        cloud["amplitudes"],
        spec,
        float(cloud["pixel_size"]),
        device,
        roughness,
        CloudExtras.from_cloud(cloud),
    )
