"""Refinement of many particles: batches, progress, resumption and chunks of a scattered run.

:func:`refine_particles` drives :func:`z3lib.refine.refine_batch` over the particles of a stack in
batches, logs rate and ETA, and saves finished batches so that a killed run resumes where it
stopped. Partial state is reused only under the exact :func:`progress_fingerprint` of the call
(inputs, settings and library version). :func:`chunk_rows` splits the particles among the jobs
of a scattered run (the stages: :mod:`z3lib.stages.refine`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from z3lib.decoder import PhysicalDecoder
from z3lib.io.coefficients import FieldRows
from z3lib.refine import (
    Landscape,
    RefineConfig,
    RefineResult,
    landscape_from_predictions,
    population_precision,
    refine_batch,
)
from z3lib.training import ParticleBatchSource, array_digest, state_digest


def images_digest(source: ParticleBatchSource, index: np.ndarray, batch_size: int = 256) -> str:
    """Return the SHA-256 (hex) of the pixels of the images of particles ``index`` of ``source``.

    They are read in batches of ``batch_size``: one pass over those images.
    """
    h = hashlib.sha256()
    idx = np.asarray(index, dtype=np.int64)
    rows = idx if source.rows is None else source.rows[idx]
    for lo in range(0, len(rows), max(1, batch_size)):
        h.update(array_digest(np.asarray(source.images[rows[lo : lo + batch_size]], dtype=np.float32)).encode())
    return h.hexdigest()


def progress_fingerprint(
    decoder: PhysicalDecoder,
    source: ParticleBatchSource,
    prior: np.ndarray | FieldRows,
    index: np.ndarray,
    config: RefineConfig,
    *,
    device: str | torch.device,
    images: str,
    inputs: Mapping[str, Any] | None = None,
) -> str:
    """Return the SHA-256 (hex) of everything the refinement of particles ``index`` depends on.

    Partial results saved under it are reused only on an exact match.

    It covers the library version (``z3lib.__version__``), every :class:`RefineConfig` setting,
    the decoder's Zernike3D basis, the device type, the rows ``index`` ``(n,)``, all predicted coefficients
    ``prior`` ``(n_total, 3K)`` (px; the landscape and the population prior are built from all
    of them), the decoder (point cloud, amplitudes, basis values and regulariser forms, box,
    pixel size), the particles' poses, shifts, CTF parameters, half-set labels and stack rows
    at ``index``, ``images`` (the identity of their images: :func:`images_digest` or
    :func:`z3lib.training.stack_identity`) and any further ``inputs`` (JSON-serialisable values).
    """
    import z3lib

    idx = np.asarray(index, dtype=np.int64)
    ti = torch.as_tensor(idx)
    ctf = source.ctf[ti]
    rows = idx if source.rows is None else source.rows[idx]
    subsets = source.subsets[idx] if len(source.subsets) else source.subsets
    record = {
        "z3lib": z3lib.__version__,
        "config": config.to_dict(),
        "zernike": decoder.spec.to_block(),
        "device": torch.device(device).type,
        "index": array_digest(idx),
        "prior": array_digest(prior),
        "decoder": {
            "state": state_digest(decoder.state_dict()),
            "box": decoder.box,
            "pixel_size": decoder.pixel_size,
            "ctf_pad": decoder.ctf_pad,
        },
        "particles": {
            "angles": array_digest(source.angles[ti]),
            "shifts": array_digest(source.shifts[ti]),
            "ctf": array_digest(*(getattr(ctf, f.name) for f in fields(ctf))),
            "subsets": array_digest(subsets),
            "rows": array_digest(rows),
            "pixel_size": source.pixel_size,
            "phase_flipped": source.phase_flipped,
        },
        "images": images,
        "inputs": dict(inputs or {}),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _search_space(
    prior: np.ndarray | FieldRows,
    config: RefineConfig,
    landscape: Landscape | None,
    device: torch.device,
    log: logging.Logger,
) -> tuple[Landscape | None, torch.Tensor | None]:
    """Return the landscape or the free mode's population precision, whichever the mode uses.

    The landscape is the population's when given; else, in landscape mode, the predictions'
    principal directions.
    """
    if config.mode == "landscape":
        if landscape is not None:
            log.info("landscape: %d direction(s) fitted to the population", len(landscape.directions))
            return landscape, None
        landscape = landscape_from_predictions(
            prior,
            variance=config.subspace_variance,
            max_dimensions=config.max_dimensions,
            min_dimensions=config.min_dimensions,
        )
        log.info("landscape: %d direction(s) of the predictions' principal components", len(landscape.directions))
        return landscape, None
    if config.prior == "population":
        return None, torch.as_tensor(population_precision(prior), dtype=torch.float32, device=device)
    return None, None


def refine_particles(
    decoder: PhysicalDecoder,
    source: ParticleBatchSource,
    prior: np.ndarray | FieldRows,
    config: RefineConfig,
    *,
    index: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    progress_path: str | Path | None = None,
    images: str | None = None,
    inputs: Mapping[str, Any] | None = None,
    log: logging.Logger | None = None,
    landscape: Landscape | None = None,
) -> RefineResult:
    """Refine particles ``index`` (default all) in batches; resumable through ``progress_path``.

    Parameters
    ----------
    decoder, source
        Physical decoder of the reference and the particles (images, poses, CTF).
    prior
        ``(n_total, 3K)`` the network's coefficients for every particle of ``source`` (px of the
        processing box); the landscape and the population prior are built from all of them, so
        every chunk of a scattered run uses the same ones. With ``landscape``: the population
        fit's coefficients on it (:func:`z3lib.population.fit_population`).
    config
        The refinement settings (the basis is the decoder's).
    index
        ``(n,)`` rows of ``source`` to refine; None: all.
    device
        Torch device of the refinement.
    log
        Logger for progress; default this module's.
    landscape
        landscape mode: the population's fitted landscape (``prior`` its coefficients; see
        ``fitted`` of :func:`refine_batch`); None: the principal directions of ``prior``.
    progress_path
        optional journal (:class:`z3lib.io.journal.Journal`) to which each finished batch's
        results are appended, under the :func:`progress_fingerprint` of this call (which covers
        the rows ``index``); a rerun skips the batches it holds only when the fingerprint
        matches exactly, else it warns and starts afresh. The caller removes the file once it
        has written the results.
    images
        identity of the images of ``index`` for the fingerprint (:func:`z3lib.training.stack_identity`); None:
        :func:`images_digest` (one extra read of them). Only used with ``progress_path``.
    inputs
        further values the fingerprint must cover (JSON-serialisable).
    """
    from z3lib.io.journal import Journal

    logger = log or logging.getLogger(__name__)
    dev = torch.device(device)
    fitted = landscape is not None and config.mode == "landscape"
    landscape, precision = _search_space(prior, config, landscape, dev, logger)
    idx = np.arange(len(source)) if index is None else np.asarray(index, dtype=np.int64)
    n, k3 = len(idx), prior.shape[1]
    out = _empty_results(n, k3)
    fingerprint = ""
    if fitted:  # the partial results belong to this landscape only
        assert landscape is not None
        inputs = {**dict(inputs or {}), "landscape": _landscape_digest(landscape)}
    if progress_path is not None:
        image_id = images if images is not None else images_digest(source, idx, config.batch_size)
        fingerprint = progress_fingerprint(
            decoder, source, prior, idx, config, device=dev, images=image_id, inputs=inputs
        )
    journal, done = None, np.zeros(n, dtype=bool)
    if progress_path is not None:
        journal, done = Journal.open(progress_path, fingerprint, out, logger)
    t0 = time.perf_counter()
    n_done_start = int(done.sum())
    for lo in range(0, n, config.batch_size):
        sl = slice(lo, min(n, lo + config.batch_size))
        if done[sl].all():
            continue
        b = source.batch(idx[sl], dev)
        res = refine_batch(
            decoder,
            b.images,
            b.angles,
            b.shifts,
            b.ctf,
            torch.as_tensor(prior[idx[sl]], dtype=torch.float32, device=dev),
            config,
            landscape=landscape,
            precision=precision,
            phase_flipped=source.phase_flipped,
            fitted=fitted,
        )
        for key, column in out.items():
            column[sl] = res[key].cpu().numpy()
        done[sl] = True
        if journal is not None:  # this batch's rows only: the partial state grows as O(n)
            journal.append(sl.start, {key: column[sl] for key, column in out.items()})
        _log_progress(logger, done, out["flagged"], n_done_start, time.perf_counter() - t0)
    return RefineResult(index=idx, **out)


def _empty_results(n: int, k3: int) -> dict[str, np.ndarray]:
    """Zeroed result columns of :class:`RefineResult` for ``n`` particles of ``k3`` coefficients."""
    return {
        "coefficients": np.zeros((n, k3)),
        "angles": np.zeros((n, 3)),
        "shifts": np.zeros((n, 2)),
        "defocus_offset": np.zeros(n),
        "cost": np.zeros(n),
        "cost_prior": np.zeros(n),
        "flagged": np.zeros(n, dtype=bool),
        "steps": np.zeros(n, dtype=np.int64),
    }


def _landscape_digest(landscape: Landscape) -> str:
    """SHA-256 (hex) of a landscape's mean, directions, scales and bounds."""
    return array_digest(landscape.mean, landscape.directions, landscape.scale, landscape.low, landscape.high)


def _log_progress(
    logger: logging.Logger, done: np.ndarray, flagged: np.ndarray, n_done_start: int, elapsed: float
) -> None:
    """Log particles refined of ``len(done)``, the rate since this call's start (s), ETA and flags."""
    n, n_done = len(done), int(done.sum())
    rate = (n_done - n_done_start) / max(elapsed, 1e-9)
    logger.info(
        "refined %d/%d particles (%.1f particles/s, ETA %.0f s), %d flagged so far",
        n_done,
        n,
        rate,
        (n - n_done) / max(rate, 1e-9),
        int(flagged[done].sum()),
    )


def chunk_rows(n: int, chunk: int, n_chunks: int) -> np.ndarray:
    """Contiguous rows of chunk ``chunk`` (0-based) of ``n_chunks`` over ``n`` particles."""
    if not 0 <= chunk < n_chunks:
        raise ValueError(f"chunk {chunk} is not in 0…{n_chunks - 1}")
    bounds = np.linspace(0, n, n_chunks + 1).round().astype(np.int64)
    return np.arange(bounds[chunk], bounds[chunk + 1])
