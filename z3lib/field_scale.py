"""The frame and the size of the fields ZART corrects with.

A particle's field is measured against the reference it was refined against, whose own
conformation is some average of the population. :func:`centre_fields` moves every field into
the frame of the population's typical member (the medoid of each half set, or the mean), so that
the corrected map shows a real conformation and not the mean of the fields. How much of each
field to apply is chosen from the data (:func:`choose_field_scale`): each candidate scale gives
gold-standard half maps whose FSC inside the mask, and whose correlation with particles held out
of the reconstruction, measure what the correction buys; fields too noisy to help are shrunk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from z3lib.io.coefficients import FieldRows
from z3lib.zart import ZartConfig, heldout_correlation, masked_fsc, reconstruct_zart, values_to_volume

FIELD_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)  # the candidates of field_scale "auto"
SCALE_PARTICLES = 1000  # particles per half set that choose the field scale (fewer: all)
SCALE_ITERATIONS = 2  # ZART iterations of each candidate's half maps


MEDOID_FRACTION = 0.05  # share of a half set whose mean field is the "medoid" frame


def geometric_median(points: np.ndarray, *, iterations: int = 200, tol: float = 1e-10) -> np.ndarray:
    """Return the point ``(D,)`` that minimises the summed Euclidean distance to ``points`` ``(n, D)``.

    Weiszfeld's iteration from the coordinate-wise median; a point that coincides with a sample is
    kept away from a division by zero.
    """
    x = np.asarray(points, dtype=np.float64)
    m = np.median(x, axis=0)
    for _ in range(iterations):
        w = 1.0 / np.maximum(np.linalg.norm(x - m, axis=1), 1e-12)
        new: np.ndarray = (w[:, None] * x).sum(0) / w.sum()
        if np.linalg.norm(new - m) <= tol * (1.0 + np.linalg.norm(m)):
            return new
        m = new
    return m


#: Most rows of a half set whose geometric median is solved for (evenly spaced). The median of
#: 4,096 rows differs from the whole half's by about 2 % of the landscape's spread (1.25/√4096), and the frame is
#: then the mean of the nearest 5 % of *all* rows; the solve holds a few (rows × 3K) float64
#: arrays, 12 MB each at (7,7) (20,000 rows made ZART's peak grow 170 MB from 10k to 100k particles).
MEDOID_SAMPLE = 4096
FRAME_BLOCK = 4096  # rows read at once when a frame is measured over a half set


def medoid_field(coefficients: Any, *, fraction: float = MEDOID_FRACTION, rows: np.ndarray | None = None) -> np.ndarray:
    """Return the mean ``(3K,)`` of the coefficient vectors nearest to their geometric median.

    Nearest in the Euclidean sense (for the orthonormal basis, the RMS field difference over the
    ball); at least one and ``fraction`` of them: a conformation that particles take, at the centre
    of the landscape. On a landscape that is a straight, symmetric segment it is the mean; on a
    curved one (a path through an intermediate) the mean lies off the path, where no particle is,
    and a map in that frame is an average of conformations instead of one.

    ``coefficients`` is ``(n, 3K)`` (an array, or :class:`~z3lib.io.coefficients.FieldRows` read from disk) and
    ``rows`` the vectors to use (default all). The median is solved on at most
    :data:`MEDOID_SAMPLE` evenly spaced rows (all of them below that); the distances and the mean
    go over every row, :data:`FRAME_BLOCK` at a time.
    """
    rows = np.arange(len(coefficients)) if rows is None else np.asarray(rows, dtype=np.int64)
    sample = rows if len(rows) <= MEDOID_SAMPLE else rows[np.linspace(0, len(rows) - 1, MEDOID_SAMPLE).astype(np.int64)]
    centre = geometric_median(np.asarray(coefficients[sample], dtype=np.float64))
    distance = np.concatenate(
        [
            np.linalg.norm(np.asarray(coefficients[rows[lo : lo + FRAME_BLOCK]], np.float64) - centre, axis=1)
            for lo in range(0, len(rows), FRAME_BLOCK)
        ]
    )
    k = min(len(rows), max(1, round(fraction * len(rows))))
    nearest = rows[np.argsort(distance, kind="stable")[:k]]
    return _block_mean(coefficients, nearest)


def _block_mean(coefficients: Any, rows: np.ndarray) -> np.ndarray:
    """Return the mean ``(3K,)`` of ``coefficients[rows]``, read :data:`FRAME_BLOCK` rows at a time."""
    total = np.zeros(coefficients.shape[1])
    for lo in range(0, len(rows), FRAME_BLOCK):
        total += np.asarray(coefficients[rows[lo : lo + FRAME_BLOCK]], np.float64).sum(0)
    mean: np.ndarray = total / max(len(rows), 1)
    return mean


def frame_fields(coefficients: Any, halves: Sequence[np.ndarray], frame: str = "medoid") -> list[np.ndarray]:
    """Return each gold-standard half set's frame field ``(3K,)`` (zeros for an empty half).

    Each half on its own, so no information crosses them: ``"medoid"`` (:func:`medoid_field`, the
    frame of a conformation at the landscape's centre) or ``"mean"`` (the population's average
    field). ``coefficients``: ``(n, 3K)``, an array or :class:`~z3lib.io.coefficients.FieldRows`.
    """
    if frame not in ("medoid", "mean"):
        raise ValueError(f"zart.frame must be 'medoid' or 'mean', got {frame!r}")
    return [
        (
            (medoid_field(coefficients, rows=rows) if frame == "medoid" else _block_mean(coefficients, rows))
            if len(rows)
            else np.zeros(coefficients.shape[1])
        )
        for rows in (np.asarray(r, dtype=np.int64) for r in halves)
    ]


def centre_fields(coefficients: np.ndarray, halves: Sequence[np.ndarray], frame: str = "medoid") -> np.ndarray:
    """Subtract from ``(n, 3K)`` coefficients their half set's frame field (:func:`frame_fields`).

    The corrected map is then the map of that conformation; its points are the reference's pulled
    back through the frame field (:func:`pull_back`). (:class:`~z3lib.io.coefficients.FieldRows` does the
    same a batch at a time.)
    """
    out = np.array(coefficients, dtype=np.float64, copy=True)
    for rows, field in zip(halves, frame_fields(out, halves, frame), strict=True):
        out[rows] -= field
    return out


def pull_back(points: np.ndarray, spec: Any, coefficients: np.ndarray, *, iterations: int = 30) -> np.ndarray:
    """Return the reference points ``x`` that a field moves onto ``points``: ``x + d(x) = y``.

    The fields are Lagrangian: each moves the points of the reference it was fitted on (the
    consensus map's voxels, or an atomic model's atoms). A map in the frame of the field ``c``
    holds at ``y`` what the reference holds at ``x``, and particle ``i`` moves it to
    ``x + d_i(x)``: its displacement there is ``d_i(x) − d_c(x)``, with the basis evaluated at
    ``x``, not at ``y`` (which matters where the frame field is large, as between an atomic model
    and the consensus map). Fixed-point iteration ``x ← y − d(x)`` (it converges where the field's
    gradient is below 1, as for any deformation that does not fold).

    Parameters
    ----------
    points
        ``(N, 3)`` px ``y``.
    spec
        The fields' :class:`~z3lib.zernike.ZernikeSpec` (on the points' box).
    coefficients
        ``(3K,)`` the frame field ``c`` (px).
    iterations
        Most fixed-point iterations (they stop once no point moves by 1e-7 px).
    """
    y = np.asarray(points, dtype=np.float64)
    c = np.asarray(coefficients, dtype=np.float64).reshape(3, -1)
    x = y.copy()
    for _ in range(iterations):
        new = y - spec.evaluate(x) @ c.T
        moved = float(np.abs(new - x).max()) if len(x) else 0.0
        x = new
        if moved < 1e-7:  # converged (at once for a zero frame field)
            break
    return x


def _score_scale(
    coeffs: np.ndarray | FieldRows | None,
    backend: Any,
    half_points: Sequence[np.ndarray],
    half_basis: Sequence[np.ndarray],
    images: Any,
    table: Any,
    subsets: Sequence[np.ndarray],
    box: int,
    pixel_size: float,
    config: ZartConfig,
    fsc_mask: np.ndarray,
    step: int,
) -> dict[str, float]:
    """Score one candidate of :func:`choose_field_scale`: the scaled fields ``coeffs`` ``(n, 3K)`` px.

    Both half maps are reconstructed from ``subsets`` with ``coeffs`` (None: no fields); each
    predicts the other half's images. Returns ``score`` (the mean held-out image correlation),
    ``fsc_area`` and ``resolution_0143`` of the half maps inside ``fsc_mask``.
    """
    from z3lib.analysis import fsc_area, resolution_at

    values = []
    for h, rows in enumerate(subsets):
        basis = half_basis[h] if coeffs is not None else None
        vals, _ = reconstruct_zart(backend, half_points[h], basis, coeffs, images, table, rows, box, pixel_size, config)
        values.append(vals)
    score = 0.5 * sum(
        heldout_correlation(
            backend,
            values[h],
            half_points[h],
            half_basis[h],
            coeffs,
            images,
            table,
            subsets[1 - h],
            box,
            pixel_size,
            config,
        )
        for h in (0, 1)
    )
    maps = [values_to_volume(values[h], half_points[h], box, step=step) for h in (0, 1)]
    fsc = masked_fsc(maps[0], maps[1], fsc_mask, pixel_size, step=step)
    return {"score": score, "fsc_area": fsc_area(fsc), "resolution_0143": resolution_at(fsc, 0.143)}


def choose_field_scale(
    backend: Any,
    half_points: Sequence[np.ndarray],
    half_basis: Sequence[np.ndarray],
    fields: np.ndarray | FieldRows,
    images: Any,
    table: Any,
    halves: Sequence[np.ndarray],
    box: int,
    pixel_size: float,
    config: ZartConfig,
    fsc_mask: np.ndarray,
    *,
    step: int = 1,
    log: logging.Logger | None = None,
) -> tuple[float, pd.DataFrame]:
    """Choose the field scale s of :data:`FIELD_SCALES` whose corrected maps best predict held-out images.

    The images are those of the particles the maps were not built from (cross-validation; no ground
    truth is used).

    Each candidate reconstructs both half sets (at most :data:`SCALE_PARTICLES` particles each,
    :data:`SCALE_ITERATIONS` iterations) with ``s · fields``; half 1's map, deformed by each
    half-2 particle's own ``s · field``, predicts that particle's image, and the other way round
    (:func:`heldout_correlation`). The score is the mean of the two correlations: fields that
    describe the images move the map where the held-out particles put their density, and fields
    that are noise blur the map and misplace it, so s = 0 (the uncorrected map) wins when the
    fields do not help. The half-map FSC is reported beside it (``fsc_area``,
    ``resolution_0143``, inside ``fsc_mask``) but does not choose: it measures how alike the two
    halves are, not how right, and on the yardstick (ASPIRE images, reconstructed consensus) it
    picked s = 0.75 on each scenario where the map against the truth was best at s = 1, and an
    earlier mix with an FSC against the other half's uncorrected map picked 0.25.

    Returns
    -------
    the chosen s and a table (``scale``, ``score``, ``fsc_area``, ``resolution_0143``) of every
    candidate.
    """
    logger = log or logging.getLogger(__name__)
    rng = np.random.default_rng([config.seed, 7])
    subsets = [
        np.sort(rng.choice(rows, SCALE_PARTICLES, replace=False)) if len(rows) > SCALE_PARTICLES else rows
        for rows in halves
    ]
    quick = replace(config, iterations=min(config.iterations, SCALE_ITERATIONS))
    records = []
    for scale in FIELD_SCALES:
        args = (backend, half_points, half_basis, images, table, subsets, box, pixel_size, quick)
        scaled: np.ndarray | FieldRows | None = None
        if scale > 0:
            if isinstance(fields, FieldRows):
                scaled = fields.scaled(scale, np.float32)
            else:
                scaled = (scale * np.asarray(fields)).astype(np.float32)
        records.append({"scale": scale, **_score_scale(scaled, *args, fsc_mask, step)})
        scores = (scale, records[-1]["score"], records[-1]["fsc_area"], records[-1]["resolution_0143"])
        logger.info(
            "field scale %.2f: held-out image correlation %.5f (half-map FSC area %.4f, %.2f Å at 0.143)", *scores
        )
    frame = pd.DataFrame(records)
    best = float(frame.loc[frame["score"].idxmax(), "scale"])
    candidates = ", ".join(f"{s:g}" for s in FIELD_SCALES)
    logger.info("field scale %.2f chosen (of %s) on %d + %d particles", best, candidates, *map(len, subsets))
    return best, frame
