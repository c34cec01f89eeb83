"""Stage ``predict``: every particle's Zernike3D coefficients from the trained network(s).

The coefficients come from :func:`z3lib.training.predict_coefficients` and are written as the
particles' STAR and ``coefficients.npy`` (px of the original box).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from z3lib.conventions import shift_angstrom_to_pixels, shift_pixels_to_angstrom
from z3lib.io import Particles, release_memory
from z3lib.network import Zernike3Deep, load_model
from z3lib.training import PREDICT_BATCH_SIZE, ParticleBatchSource, predict_coefficients
from z3lib.zernike import ZernikeSpec


def predict(
    model_path: str | Path | Sequence[str | Path],
    particles: str | Path,
    original_particles: str | Path,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = PREDICT_BATCH_SIZE,
    pixel_size: float | None = None,
    image_root: str | Path | None = None,
    poses: str | Path | None = None,
    log: logging.Logger | None = None,
) -> dict[str, Path]:
    """Predict the coefficients of every particle; write ``particles.star`` and ``coefficients.npy``.

    The STAR is the user's input STAR (every input column, input row order) plus
    ``zernikeCoefficients`` (3K floats, px of the original box, Rmax = original box / 2), the
    ``data_zernike3d`` block and, with pose refinement, the corrected angles and shifts and the
    Flexutils ``delta_*`` columns. ``coefficients.npy`` is the same ``(n, 3K)`` array.

    Parameters
    ----------
    model_path
        one ``model.pt``, or one per gold-standard half set (independent halves): each model
        then encodes exactly the particle rows it was trained on (its ``meta["rows"]``), and the
        models' rows must cover every particle once.
    particles
        the preprocess stage's STAR (processing box), whose images are encoded.
    original_particles
        the user's STAR or ``.cs`` (same particles, same order) the output STAR is built from.
    out_dir
        Where ``particles.star`` and ``coefficients.npy`` are written (each atomically).
    device
        Torch device of the encoder.
    batch_size
        Particles encoded at once.
    pixel_size, image_root
        the overrides the preprocess stage used for ``original_particles`` (and ``poses``).
    poses
        the STAR with the particles' latest poses and CTF (round k ≥ 2: round k−1's refine
        ``particles.star``), same particles and order, original box: the network encodes the
        particles at these poses (:func:`z3lib.io.apply_poses`) and the output STAR carries them
        (plus the network's corrections with pose refinement), so that refinement starts from
        them. None: the poses of ``particles`` and ``original_particles``.
    log
        Logger for progress; default this module's.
    """
    from z3lib.io import CoefficientFile, apply_poses, read_particles, write_particles_star

    logger = log or logging.getLogger(__name__)
    out = Path(out_dir)
    model_paths = [model_path] if isinstance(model_path, (str, Path)) else list(model_path)
    if not model_paths:
        raise ValueError("predict needs at least one model")
    # no particle table is held while encoding: the batches need only the source's arrays, and
    # the output STAR reads the user's file again at the end
    parts = _checked_particles(particles, original_particles, poses, pixel_size, image_root, logger)
    source = ParticleBatchSource.from_particles(parts)
    n, box = len(source), parts.box
    del parts  # the table's pages go back before the models are loaded on top of them
    release_memory()
    models = _load_models(model_paths, n, box, particles, device)
    cfg, meta = models[0][0].config, models[0][1]
    spec = cfg.zernike_spec(int(meta["box"]))
    spec_orig = spec.rescaled(int(meta["original_box"]))
    paths = {"particles": out / "particles.star", "coefficients": out / "coefficients.npy"}
    pred = _encode(models, source, paths["coefficients"], spec, spec_orig, device, batch_size, logger)
    source.images.close()
    del models, source
    release_memory()  # the networks' and the batches' memory, before the user's STAR is read again
    columns: dict[str, Any] = {"zernikeCoefficients": CoefficientFile(paths["coefficients"])}
    original = read_particles(original_particles, pixel_size=pixel_size, image_root=image_root)
    table = None
    if poses is not None:  # written back into the output STAR
        table = apply_poses(original, read_particles(poses, pixel_size=pixel_size, image_root=image_root)).table
    if cfg.refine_pose:
        table = (original.table if table is None else table).copy()
        columns.update(_apply_pose_corrections(table, pred, float(meta["pixel_size"]), original.pixel_size))
    write_particles_star(paths["particles"], original, columns=columns, zernike=spec_orig, table=table)
    return paths


def _encode(
    models: list[tuple[Zernike3Deep, dict[str, Any], np.ndarray]],
    source: ParticleBatchSource,
    path: Path,
    spec: ZernikeSpec,
    spec_orig: ZernikeSpec,
    device: str | torch.device,
    batch_size: int,
    logger: logging.Logger,
) -> dict[str, np.ndarray]:
    """Encode every particle of ``source``, each by its model; write the coefficients to ``path``.

    The coefficients go to the file as they are made (px of the original box ``spec_orig``, from
    the processing box ``spec``), never all in memory; returns the other per-particle outputs
    (the pose corrections), ``(n, …)`` in the particles' order.
    """
    from z3lib.io import open_coefficient_writer

    n = len(source)
    t0 = time.perf_counter()
    pred: dict[str, np.ndarray] = {}
    with open_coefficient_writer(path, n, spec_orig.n_coefficients) as writer:
        for net, _, rows in models:
            part = predict_coefficients(
                net,
                source if len(models) == 1 else source.take(rows),
                device=device,
                batch_size=batch_size,
                log=logger,
                coefficients_out=_Converted(writer, rows, lambda c: spec.convert(c, spec_orig)),
            )
            for key, values in part.items():
                pred.setdefault(key, np.zeros((n,) + values.shape[1:], dtype=values.dtype))[rows] = values
    elapsed = time.perf_counter() - t0
    logger.info("encoded %d particles in %.1f s (%.0f images/s)", n, elapsed, n / max(elapsed, 1e-9))
    return pred


def _checked_particles(
    particles: str | Path,
    original_particles: str | Path,
    poses: str | Path | None,
    pixel_size: float | None,
    image_root: str | Path | None,
    logger: logging.Logger,
) -> Particles:
    """Return the processing-box particles (at the latest ``poses``), checked against the user's STAR.

    The user's STAR (and ``poses``) must hold the same particles in the same order; they are
    read, checked and let go.
    """
    from z3lib.io import apply_poses, read_particles

    parts = read_particles(particles)
    original = read_particles(original_particles, pixel_size=pixel_size, image_root=image_root)
    if len(parts) != len(original):
        raise ValueError(
            f"{particles} has {len(parts)} particles but {original_particles} has {len(original)}; "
            "they must be the same particles in the same order"
        )
    if poses is not None:
        latest = read_particles(poses, pixel_size=pixel_size, image_root=image_root)
        parts = apply_poses(parts, latest)
        apply_poses(original, latest)  # the same particles: checked now, not after the encoding
        logger.info("poses and CTF of the %d particles from %s", len(parts), poses)
    return parts


class _Converted:
    """A model's batches of coefficients, converted on their way into the file.

    ``out[index] = values``: ``values`` (the model's own particle numbers ``index``, px of the
    processing box) converted by ``convert`` go to ``writer``'s rows ``rows[index]``.
    """

    def __init__(self, writer: Any, rows: np.ndarray, convert: Any) -> None:
        self.writer, self.rows, self.convert = writer, rows, convert

    def __setitem__(self, index: np.ndarray, values: np.ndarray) -> None:
        self.writer[self.rows[index]] = self.convert(values)


def _load_models(
    model_paths: list[str | Path], n: int, box: int, particles: str | Path, device: str | torch.device
) -> list[tuple[Zernike3Deep, dict[str, Any], np.ndarray]]:
    """Load each model with its metadata and the particle rows it encodes.

    ``n`` particles of ``box`` px (those of ``particles``). All rows for one model; its
    ``meta["rows"]`` for one per half set, which must cover every particle once.
    """
    models = []
    covered = np.zeros(n, dtype=np.int64)
    for path in model_paths:
        net, meta = load_model(path, device)
        if box != int(meta["box"]):
            raise ValueError(f"{particles} holds {box} px images but {path} was trained at box {meta['box']}")
        rows = np.arange(n) if len(model_paths) == 1 else np.asarray(meta.get("rows", np.arange(0)), np.int64)
        if len(model_paths) > 1 and int(meta.get("n_total", -1)) != n:
            raise ValueError(
                f"{path} was trained on a half set of {meta.get('n_total')} particles, not of the {n} in {particles}"
            )
        covered[rows] += 1
        models.append((net, meta, rows))
    if not np.all(covered == 1):
        raise ValueError(
            f"the models {[str(p) for p in model_paths]} cover {int((covered > 0).sum())} of {n} "
            "particles (each must be encoded by exactly one model)"
        )
    return models


def _apply_pose_corrections(
    table: pd.DataFrame, pred: dict[str, np.ndarray], processing_pixel_size: float, pixel_size: float
) -> dict[str, np.ndarray]:
    """Add the network's δ-angles and δ-shifts to ``table``'s poses, in place.

    δ-angles in deg; δ-shifts in px of the processing box, written in px of the particles as given
    (``pixel_size`` Å). Returns the Flexutils ``delta_*`` columns.
    """
    d_ang = pred["delta_angles"]
    # δ-shifts: px of the processing box → Å → px of the particles as given
    d_shift = shift_angstrom_to_pixels(
        shift_pixels_to_angstrom(pred["delta_shifts"], processing_pixel_size), pixel_size
    )
    for j, name in enumerate(("rot", "tilt", "psi")):
        table[name] = table[name].to_numpy() + d_ang[:, j]
    table["shift_x"] = table["shift_x"].to_numpy() + d_shift[:, 0]
    table["shift_y"] = table["shift_y"].to_numpy() + d_shift[:, 1]
    return {
        "delta_angle_rot": d_ang[:, 0],
        "delta_angle_tilt": d_ang[:, 1],
        "delta_angle_psi": d_ang[:, 2],
        "delta_shift_x": d_shift[:, 0],
        "delta_shift_y": d_shift[:, 1],
    }
