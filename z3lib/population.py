"""The landscape fitted by the whole population: shared motion directions, per-particle scores.

The network's predictions give each particle a field, and their principal directions a
landscape. At low SNR those directions are poor: the encoder's errors shrink the predicted
fields (regression to the mean) and mix spurious motion of the static parts into every
direction, and one particle's image cannot correct a direction that all particles share. Here
the directions are refitted against *all* images at once, alternating two steps:

1. **directions**: with every particle's scores ``z_i`` fixed, the shared mean field and
   directions minimise the summed image loss of the population,

       min_{μ, D}  Σ_i loss(image_i, CTF_i ∗ P(μ + z_i · D, pose_i)) + w · Σ_i roughness(μ + z_i · D)

   (mini-batch Adam over the particles, its step annealed to zero over each round by default
   so that the directions settle instead of following the last mini-batches; ``D`` is
   ``(k, 3K)``, one row per direction). A refit that leaves the objective over all particles
   higher than before is refused, so the alternation never goes uphill;
2. **scores**: every particle is scored on a grid along each direction (coordinate-wise, as the
   landscape refinement does; the first round starts from the network's predicted scores) or,
   in the later rounds with ``population_joint_cells`` set, on one joint grid over the
   directions that carry motion (:func:`joint_block`), kept where the previous round's scores
   lie (:func:`joint_grid`), and its score is
   the **posterior mean** over that grid: the image
   likelihood with Gaussian noise of unknown level, scale and offset, profiled, is
   ``−log L = (N/2) · log(1 − corr²)`` (``N`` pixels inside the mask, ``corr`` the correlation of
   the image with the projection), and the prior over the grid is the population's own score
   histogram, estimated by EM (a discrete, non-parametric prior; on the joint grid the joint
   histogram, which follows a motion that turns). The posterior mean is the
   least-squares estimate of each particle's coordinate; the grid's best point (maximum
   likelihood) scatters wider at low SNR.

The result is a landscape (:class:`z3lib.refine.Landscape`: mean, orthonormal directions, scale
and range of the scores) and every particle's coefficients ``μ + s_i · U``. This is the linear
flow model of 3DFlex-like methods with the Zernike3D basis as its generator, fitted by hard
alternation from the network's landscape as the start.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from z3lib.conventions import euler_to_matrix
from z3lib.decoder import PhysicalDecoder, circle_mask, image_loss
from z3lib.refine import Landscape, RefineConfig, landscape_from_predictions
from z3lib.training import ParticleBatchSource

POSTERIOR_EM_ITERATIONS = 50  # EM steps of the grid prior (converges in a few tens)
JOINT_DILATION = 1  # the joint grid keeps this many cells around every occupied one
JOINT_MIN_POINTS = 7  # the joint grid is never coarser than this many points per direction
JOINT_MIN_SHARE = 0.1  # a direction joins the joint grid when its fields spread ≥ this × the largest


@dataclass(frozen=True)
class PopulationFit:
    """The fitted landscape and every particle's result (px of the processing box).

    ``coefficients[i] = landscape.mean + scores[i] · landscape.directions``.
    """

    landscape: Landscape
    scores: np.ndarray  # (n, k) px along the orthonormal directions
    coefficients: np.ndarray  # (n, 3K)
    history: list[dict[str, float]]  # one entry per round: mean image loss after each step

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return the arrays of :func:`write_population` (``landscape_*`` and per-particle ones)."""
        land = self.landscape
        return {
            "landscape_mean": land.mean,
            "landscape_directions": land.directions,
            "landscape_scale": land.scale,
            "landscape_low": land.low,
            "landscape_high": land.high,
            "scores": self.scores,
            "coefficients": self.coefficients,
        }


def write_population(path: str | Path, fit: PopulationFit, **extra: np.ndarray | np.generic) -> Path:
    """Write a :class:`PopulationFit` (and ``extra`` arrays) to ``path`` (``.npz``, atomic)."""
    from z3lib.io import write_npz

    write_npz(path, **fit.to_arrays(), **extra)
    return Path(path)


def read_population(path: str | Path) -> tuple[Landscape, np.ndarray]:
    """Read the landscape and the per-particle coefficients ``(n, 3K)`` written by :func:`write_population`."""
    from z3lib.io import Z3InputError, read_npz

    arrays = read_npz(path)
    keys = (
        "landscape_mean",
        "landscape_directions",
        "landscape_scale",
        "landscape_low",
        "landscape_high",
        "coefficients",
    )
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise Z3InputError(
            f"{path} is not a population landscape (no {', '.join(missing)}); remake it with the refine_landscape rule"
        )
    land = Landscape(
        mean=arrays["landscape_mean"],
        directions=arrays["landscape_directions"],
        scale=arrays["landscape_scale"],
        low=arrays["landscape_low"],
        high=arrays["landscape_high"],
    )
    return land, np.asarray(arrays["coefficients"], dtype=np.float64)


def posterior_mean_scores(
    costs: np.ndarray, grid: np.ndarray, n_pixels: float, iterations: int = POSTERIOR_EM_ITERATIONS
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and standard deviation of each particle's score on a grid.

    Parameters
    ----------
    costs
        ``(n, G)`` 1 − correlation of each image with the projection at each grid point.
    grid
        ``(G,)`` the grid's scores, or ``(G, k)`` for a grid over ``k`` directions at once.
    n_pixels
        pixels of the mask the correlation is taken over (the likelihood's sample size).
    iterations
        EM iterations of the prior over the grid.

    Returns
    -------
    ``(n,)`` (or ``(n, k)``) posterior means and standard deviations, under the prior over the
    grid points that maximises the marginal likelihood of all particles (EM). On a joint grid
    that prior is the population's joint histogram: where the particles lie along a curved path
    it lies on that path too, which scores along one direction at a time cannot express.
    """
    corr = np.clip(1.0 - np.asarray(costs, dtype=np.float64), 0.0, 1.0 - 1e-9)
    nll = 0.5 * float(n_pixels) * np.log1p(-(corr**2))
    nll -= nll.min(axis=1, keepdims=True)
    like = np.exp(-nll)  # (n, G), best point 1
    prior = np.full(len(grid), 1.0 / len(grid))
    post = like * prior
    for _ in range(max(1, iterations)):
        post = like * prior
        post /= post.sum(axis=1, keepdims=True)
        prior = post.mean(axis=0) + 1e-12
        prior /= prior.sum()
    values = np.asarray(grid, dtype=np.float64)
    mean = post @ values
    spread = values[None] - mean[:, None]  # (n, G) or (n, G, k)
    weights = post if values.ndim == 1 else post[:, :, None]
    sd = np.sqrt(np.maximum((weights * spread**2).sum(axis=1), 0.0))
    return mean, sd


def _rotations(batch_angles: torch.Tensor) -> torch.Tensor:
    """``(B, 3)`` deg (rot, tilt, psi) → ``(B, 3, 3)`` rotation matrices."""
    rot: torch.Tensor = euler_to_matrix(batch_angles[:, 0], batch_angles[:, 1], batch_angles[:, 2])
    return rot


def fit_directions(
    decoder: PhysicalDecoder,
    source: ParticleBatchSource,
    mean: torch.Tensor,
    directions: torch.Tensor,
    scores: np.ndarray,
    config: RefineConfig,
    *,
    device: torch.device,
    seed: int = 0,
    log: logging.Logger | None = None,
) -> float:
    """Step 1: refit the shared ``mean`` and ``directions`` to all particles' images at fixed scores.

    ``mean`` ``(3K,)`` and ``directions`` ``(k, 3K)`` (px) are updated in place, at fixed
    ``scores`` ``(n, k)``. The alternation must never raise its objective (mean image loss +
    ``population_smooth_weight`` × mean roughness, over all particles): Adam's first steps are
    about ``population_learning_rate`` on every coefficient whatever the gradient, and where the
    images hardly constrain a direction (a rigid set, noise-free images) they leave motion the
    images never asked for. So the objective is measured over all particles before and after,
    and the refit is kept only if it lowered it. Returns the mean image loss at the kept
    ``mean`` and ``directions``.
    """
    logger = log or logging.getLogger(__name__)
    before = _mean_losses(decoder, source, mean, directions, scores, config, device=device)
    start = (mean.detach().clone(), directions.detach().clone())
    mean.requires_grad_(True)
    directions.requires_grad_(True)
    opt = torch.optim.Adam([mean, directions], lr=config.population_learning_rate)
    z = torch.as_tensor(scores, dtype=mean.dtype, device=device)
    mask = circle_mask(decoder.box, config.mask_radius, device=device)
    rng = np.random.default_rng(seed)
    n = len(source)
    steps = config.population_epochs * -(-n // config.population_batch_size)
    step = 0
    for epoch in range(config.population_epochs):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        total = 0.0
        for lo in range(0, n, config.population_batch_size):
            if config.population_anneal:
                for group in opt.param_groups:
                    group["lr"] = config.population_learning_rate * 0.5 * (1 + math.cos(math.pi * step / steps))
            step += 1
            rows = order[lo : lo + config.population_batch_size]
            b = source.batch(rows, device)
            coeffs = mean[None] + z[rows] @ directions
            pred = decoder(coeffs, _rotations(b.angles), b.shifts, b.ctf, phase_flipped=source.phase_flipped)
            img = image_loss(pred, b.images, mask, config.loss)
            loss = img.mean() + config.population_smooth_weight * decoder.field_roughness(coeffs).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(img.detach().sum())
        last = total / max(n, 1)
        elapsed = time.perf_counter() - t0
        logger.info(
            "  directions: epoch %d/%d, mean image loss %.6f (%.0f particles/s)",
            epoch + 1,
            config.population_epochs,
            last,
            n / max(elapsed, 1e-9),
        )
    mean.requires_grad_(False)
    directions.requires_grad_(False)
    after = _mean_losses(decoder, source, mean, directions, scores, config, device=device)
    weight = config.population_smooth_weight
    if after[0] + weight * after[1] <= before[0] + weight * before[1]:
        return after[0]
    with torch.no_grad():
        mean.copy_(start[0])
        directions.copy_(start[1])
    logger.info(
        "  directions: kept the previous ones (objective %.6f before, %.6f after the refit)",
        before[0] + weight * before[1],
        after[0] + weight * after[1],
    )
    return before[0]


def _block_costs(
    decoder: PhysicalDecoder,
    source: ParticleBatchSource,
    mean: torch.Tensor,
    directions: torch.Tensor,
    scores: np.ndarray,
    block: list[int],
    grid: np.ndarray,
    config: RefineConfig,
    *,
    device: torch.device,
    log: logging.Logger,
) -> np.ndarray:
    """``(n, M)`` 1 − correlation of every image at its ``scores`` with the ``block`` columns set to each grid row.

    ``grid`` is ``(M, len(block))``. The grid points' shared part of the field moves the cloud
    once per batch (:meth:`PhysicalDecoder.deformed_points`); each particle's own part (its
    scores along the other directions) is one image-plane offset per batch
    (:meth:`PhysicalDecoder.field_offsets`), so each grid point costs a projection only.
    """
    n, k = scores.shape
    others = [j for j in range(k) if j not in block]
    mask = circle_mask(decoder.box, config.mask_radius, device=device)
    costs = np.empty((n, len(grid)))
    t0 = time.perf_counter()
    with torch.no_grad():
        cells = torch.as_tensor(grid, dtype=mean.dtype, device=device)
        fields = mean[None] + cells @ directions[block]  # (M, 3K)
        z_others = torch.as_tensor(scores[:, others], dtype=mean.dtype, device=device)
        for lo in range(0, n, config.batch_size):
            rows = np.arange(lo, min(n, lo + config.batch_size))
            b = source.batch(rows, device)
            rot = _rotations(b.angles)
            transfer = decoder.transfer(
                b.ctf, phase_flipped=source.phase_flipped, device=device, dtype=decoder.amplitudes.dtype
            )
            offsets = decoder.field_offsets(z_others[rows] @ directions[others], rot) if others else None
            for m in range(len(grid)):
                cloud = decoder.deformed_points(fields[m : m + 1])[0]
                pred = decoder.project_points(cloud, rot, b.shifts, transfer, offsets=offsets)
                costs[rows, m] = image_loss(pred, b.images, mask, "corr").cpu().numpy()
            if (lo // config.batch_size) % 4 == 3 or rows[-1] == n - 1:
                done = int(rows[-1]) + 1
                rate = done / max(time.perf_counter() - t0, 1e-9)
                log.info(
                    "  scoring direction(s) %s: %d/%d particles on %d grid points (%.1f/s, ETA %.0f s)",
                    ",".join(str(j + 1) for j in block),
                    done,
                    n,
                    len(grid),
                    rate,
                    (n - done) / max(rate, 1e-9),
                )
    return costs


def _score_block(
    decoder: PhysicalDecoder,
    source: ParticleBatchSource,
    mean: torch.Tensor,
    directions: torch.Tensor,
    scores: np.ndarray,
    block: list[int],
    grid: np.ndarray,
    config: RefineConfig,
    *,
    device: torch.device,
    log: logging.Logger,
) -> np.ndarray:
    """Return ``scores`` with the ``block`` columns re-estimated on ``grid`` ``(M, len(block))``.

    Posterior means over the grid points (the prior: the population's histogram over them, by
    EM), or the best point with ``posterior_mean`` off.
    """
    costs = _block_costs(decoder, source, mean, directions, scores, block, grid, config, device=device, log=log)
    z = np.array(scores, dtype=np.float64)
    if config.posterior_mean:
        n_pixels = float(circle_mask(decoder.box, config.mask_radius).sum())
        z[:, block], sd = posterior_mean_scores(costs, grid, n_pixels)
        log.info(
            "  scores along direction(s) %s: posterior sd %s of a spread %s (%d grid points)",
            ",".join(str(j + 1) for j in block),
            np.array2string(sd.mean(axis=0), precision=3),
            np.array2string(z[:, block].std(axis=0), precision=3),
            len(grid),
        )
    else:
        z[:, block] = np.asarray(grid)[np.argmin(costs, axis=1)]
    return z


def score_particles(
    decoder: PhysicalDecoder,
    source: ParticleBatchSource,
    mean: torch.Tensor,
    directions: torch.Tensor,
    scores: np.ndarray,
    config: RefineConfig,
    *,
    device: torch.device,
    log: logging.Logger | None = None,
    columns: list[int] | None = None,
) -> tuple[np.ndarray, float]:
    """Step 2: score every particle along ``directions``, one direction at a time.

    Every particle's scores ``(n, k)`` on a grid of ``population_grid_points`` along each
    direction of ``columns`` (default all) in turn, over the population's range × ``grid_extent``
    (from ``scores``), the others held at their current values; returns them and the mean
    image loss at them.
    """
    logger = log or logging.getLogger(__name__)
    z = np.array(scores, dtype=np.float64)
    for j in range(z.shape[1]) if columns is None else columns:
        mid = 0.5 * (z[:, j].min() + z[:, j].max())
        half = 0.5 * (z[:, j].max() - z[:, j].min()) * config.grid_extent
        grid = np.linspace(mid - half, mid + half, config.population_grid_points)[:, None]
        z = _score_block(decoder, source, mean, directions, z, [j], grid, config, device=device, log=logger)
    loss = _mean_losses(decoder, source, mean, directions, z, config, device=device)[0]
    return z, loss


def score_particles_joint(
    decoder: PhysicalDecoder,
    source: ParticleBatchSource,
    mean: torch.Tensor,
    directions: torch.Tensor,
    scores: np.ndarray,
    block: list[int],
    grid: np.ndarray,
    config: RefineConfig,
    *,
    device: torch.device,
    log: logging.Logger | None = None,
) -> tuple[np.ndarray, float]:
    """Step 2 over several directions at once: the ``block`` columns on the joint ``grid`` ``(M, len(block))``.

    The posterior's prior is the population's joint histogram over the grid points, which
    follows a motion that turns; the other directions keep their ``scores``. Returns the scores
    ``(n, k)`` and the mean image loss at them.
    """
    logger = log or logging.getLogger(__name__)
    z = _score_block(decoder, source, mean, directions, scores, block, grid, config, device=device, log=logger)
    loss = _mean_losses(decoder, source, mean, directions, z, config, device=device)[0]
    return z, loss


def joint_grid(scores: np.ndarray, points: int, extent: float, max_cells: int) -> np.ndarray | None:
    """Return the points ``(M, k)`` of a joint scoring grid over all ``k`` directions, or None.

    A regular grid with ``points`` per direction over the range of ``scores`` ``(n, k)`` ×
    ``extent`` (as the coordinate-wise grid), kept only where the population is: the cells the
    scores fall in and their neighbours (:data:`JOINT_DILATION` cells on every side). Where that
    is more than ``max_cells`` points, the grid is made coarser (two points fewer per direction
    at a time, down to :data:`JOINT_MIN_POINTS`); None when even that is too many.
    """
    z = np.asarray(scores, dtype=np.float64)
    k = z.shape[1]
    low, high = z.min(axis=0), z.max(axis=0)
    half = 0.5 * (high - low) * extent
    start = 0.5 * (low + high) - half
    reach = range(-JOINT_DILATION, JOINT_DILATION + 1)
    offsets = np.array(list(itertools.product(reach, repeat=k)), dtype=np.int64)  # (3^k, k)
    for g in range(int(points), JOINT_MIN_POINTS - 1, -2):
        step = np.maximum(2.0 * half / (g - 1), 1e-12)
        occupied = np.unique(np.clip(np.rint((z - start) / step), 0, g - 1).astype(np.int64), axis=0)
        cells = (occupied[:, None, :] + offsets[None]).reshape(-1, k)
        cells = np.unique(cells[((cells >= 0) & (cells < g)).all(axis=1)], axis=0)
        if len(cells) <= max_cells:
            return np.asarray(start + cells * step)
    return None


def _mean_losses(
    decoder: PhysicalDecoder,
    source: ParticleBatchSource,
    mean: torch.Tensor,
    directions: torch.Tensor,
    scores: np.ndarray,
    config: RefineConfig,
    *,
    device: torch.device,
) -> tuple[float, float]:
    """Mean image loss and mean field roughness of all particles at ``mean + scores · directions``."""
    mask = circle_mask(decoder.box, config.mask_radius, device=device)
    image, rough = 0.0, 0.0
    with torch.no_grad():
        for lo in range(0, len(source), config.batch_size):
            rows = np.arange(lo, min(len(source), lo + config.batch_size))
            b = source.batch(rows, device)
            coeffs = mean[None] + torch.as_tensor(scores[rows], dtype=mean.dtype, device=device) @ directions
            pred = decoder(coeffs, _rotations(b.angles), b.shifts, b.ctf, phase_flipped=source.phase_flipped)
            image += float(image_loss(pred, b.images, mask, config.loss).sum())
            rough += float(decoder.field_roughness(coeffs).sum())
    n = max(len(source), 1)
    return image / n, rough / n


def fit_population(
    decoder: PhysicalDecoder,
    source: ParticleBatchSource,
    prior: np.ndarray,
    config: RefineConfig,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    log: logging.Logger | None = None,
) -> PopulationFit:
    """Fit the landscape to all particles of ``source`` from the network's predictions.

    Parameters
    ----------
    decoder
        the physical decoder of the reference the fields refer to (px of the processing box).
    source
        all particles (their images, poses and CTFs).
    prior
        ``(n, 3K)`` the network's coefficients (px of the processing box), same order.
    config
        ``subspace_variance``/``max_dimensions`` (the starting directions), ``grid_extent``,
        ``batch_size`` (scoring), ``population_*`` and ``posterior_mean``.
    device
        Torch device of the fit.
    seed
        Seed of the mini-batch order (round ``r`` uses ``seed + r``).
    log
        Logger for progress; default this module's.

    Returns
    -------
    :class:`PopulationFit` after ``config.population_rounds`` alternations, started from the
    network's landscape and each particle's predicted scores on it (0 rounds: those).
    """
    logger = log or logging.getLogger(__name__)
    dev = torch.device(device)
    land0 = landscape_from_predictions(
        prior,
        variance=config.subspace_variance,
        max_dimensions=config.max_dimensions,
        min_dimensions=config.min_dimensions,
    )
    k = len(land0.directions)
    logger.info("population landscape: %d particles, %d direction(s) from the network's predictions", len(source), k)
    z = land0.scores(np.asarray(prior, dtype=np.float64)) / land0.scale  # the network's own scores, a start only
    mean = torch.as_tensor(land0.mean, dtype=torch.float32, device=dev).clone()
    dirs = torch.as_tensor(land0.directions * land0.scale[:, None], dtype=torch.float32, device=dev).clone()
    history: list[dict[str, float]] = []
    for r in range(config.population_rounds):
        t_round = time.perf_counter()
        logger.info("round %d/%d: directions from all particles at fixed scores", r + 1, config.population_rounds)
        fit_loss = fit_directions(decoder, source, mean, dirs, z, config, device=dev, seed=seed + r, log=logger)
        z, score_loss = _score_round(decoder, source, mean, dirs, z, config, r, device=dev, log=logger)
        history.append(
            {
                "round": r + 1,
                "directions_loss": fit_loss,
                "scores_loss": score_loss,
                "seconds": time.perf_counter() - t_round,
            }
        )
        logger.info(
            "round %d/%d: mean image loss %.6f after the directions, %.6f after the scores (%.0f s)",
            r + 1,
            config.population_rounds,
            fit_loss,
            score_loss,
            time.perf_counter() - t_round,
        )
    return _orthonormal_fit(mean.cpu().numpy().astype(np.float64), dirs.cpu().numpy().astype(np.float64), z, history)


def joint_block(
    scores: np.ndarray, lengths: np.ndarray, points: int, extent: float, max_cells: int
) -> tuple[list[int], np.ndarray] | None:
    """Choose the directions to score jointly and their grid, or None.

    ``scores`` ``(n, k)`` along directions of lengths ``lengths`` ``(k,)`` (px): a direction's
    motion is its scores' spread × its length; those below :data:`JOINT_MIN_SHARE` of the
    largest carry no motion worth a grid dimension. Of the others, the largest block of leading
    ones whose :func:`joint_grid` fits ``max_cells`` points; None when no two do. Returns the
    block's columns (ascending) and the grid ``(M, len(block))``.
    """
    spread = np.asarray(scores).std(axis=0) * np.asarray(lengths)
    order = [int(j) for j in np.argsort(-spread)]
    moving = int((spread >= JOINT_MIN_SHARE * spread.max()).sum()) if spread.max() > 0 else 0
    for size in range(moving, 1, -1):
        block = sorted(order[:size])
        grid = joint_grid(np.asarray(scores)[:, block], points, extent, max_cells)
        if grid is not None:
            return block, grid
    return None


def _score_round(
    decoder: PhysicalDecoder,
    source: ParticleBatchSource,
    mean: torch.Tensor,
    directions: torch.Tensor,
    scores: np.ndarray,
    config: RefineConfig,
    r: int,
    *,
    device: torch.device,
    log: logging.Logger,
) -> tuple[np.ndarray, float]:
    """Score round ``r``: one direction at a time in the first round, jointly after it.

    After the first round, the block of :func:`joint_block` is scored jointly, then the other
    directions one at a time (all one at a time where no block fits).
    """
    rounds = config.population_rounds
    if r > 0 and config.population_joint_cells > 0 and scores.shape[1] > 1:
        lengths = directions.norm(dim=1).cpu().numpy()
        cap = config.population_joint_cells
        chosen = joint_block(scores, lengths, config.population_grid_points, config.grid_extent, cap)
        if chosen is not None:
            block, grid = chosen
            log.info(
                "round %d/%d: scores along direction(s) %s on a joint grid of %d points",
                r + 1,
                rounds,
                ",".join(str(j + 1) for j in block),
                len(grid),
            )
            z = _score_block(decoder, source, mean, directions, scores, block, grid, config, device=device, log=log)
            rest = [j for j in range(scores.shape[1]) if j not in block]
            return score_particles(decoder, source, mean, directions, z, config, device=device, log=log, columns=rest)
        log.info("round %d/%d: fewer than two moving directions fit a joint grid of %d points", r + 1, rounds, cap)
    log.info("round %d/%d: every particle's scores along each new direction in turn", r + 1, rounds)
    return score_particles(decoder, source, mean, directions, scores, config, device=device, log=log)


def _orthonormal_fit(
    mean: np.ndarray, directions: np.ndarray, scores: np.ndarray, history: list[dict[str, float]]
) -> PopulationFit:
    """``μ + z · D`` re-expressed as ``μ + s · U`` with orthonormal rows ``U`` (QR of ``D``ᵀ)."""
    q, r = np.linalg.qr(directions.T)  # D = rᵀ qᵀ
    u = q.T
    s = scores @ r.T
    land = Landscape(mean=mean, directions=u, scale=s.std(0) + 1e-12, low=s.min(0), high=s.max(0))
    return PopulationFit(landscape=land, scores=s, coefficients=mean + s @ u, history=history)
