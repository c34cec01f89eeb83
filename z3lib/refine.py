"""Classical per-particle refinement of Zernike3D fields, batched, with gradients.

The original searches each particle alone with a derivative-free optimiser (Powell, serial, on
the CPU). Here every particle of a batch has its own parameters and its own objective, and all
are optimised at once through the same physical decoder as the network (autograd, CPU or GPU).
The objective of particle i is

    cost_i = (1 − corr(image_i, CTF_i ∗ P(c_i, pose_i)))                    (image term)
             + prior_weight · prior_i(c_i)  +  smooth_weight · mean_x roughness(d(c_i))
             + pose_prior_weight · (|δangles|² + |δshift|²)

Two modes:

``"landscape"`` (default)
    The prediction moves along the landscape the network found: ``c = c_pred + (z − z_pred)·U``
    with U the main principal directions of the network's predictions over all particles (the
    prediction's part outside them is kept, so ``z = z_pred`` is the prediction). Each particle
    first gets a global search on a grid along each direction (the single-image likelihood is not
    convex, so a local method alone stays where it starts), then a local Adam refinement of ``z``.
    ``prior_i`` is the Mahalanobis distance of ``z`` from the particle's predicted scores. At low
    SNR this is what lets a single image improve on the network: a handful of well-determined
    numbers instead of 3K poorly determined ones. With ``free_steps > 0`` a last local stage
    moves all 3K coefficients from there, under a prior on the size and roughness of the change,
    so a particle can leave the landscape where its image says so. By default the pipeline first
    refits that landscape to the whole population (:mod:`z3lib.population`, rule
    ``refine_landscape``); the particles then start from their fitted coefficients, which are
    their start and the baseline they must beat (``fitted`` of :func:`refine_batch`).
``"free"``
    All 3K coefficients are free (Adam from the prediction), with ``prior_i`` the Mahalanobis
    distance under the population covariance (or the mean squared field difference) and an
    optional degree schedule (l2 ≤ 1 terms first).

Each particle stops on its own when its cost has not improved for ``patience`` steps and keeps the
best parameters it reached. A particle whose image term does not beat its start (the network's
prediction, or the population fit) keeps it and is flagged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

from z3lib import zernike as zk
from z3lib.conventions import euler_to_matrix
from z3lib.ctf import CtfParams
from z3lib.decoder import DecoderOptions, Loss, PhysicalDecoder, Roughness, circle_mask, image_loss
from z3lib.network import CloudExtras, NetworkConfig
from z3lib.settings import check_choices, from_section


@dataclass
class RefineConfig:
    """Settings of the classical refinement (coefficients in px of the processing box).

    The defaults are the pipeline's (``refine`` of the config schema; a test keeps them equal).
    """

    mode: Literal["landscape", "free"] = "landscape"
    subspace_variance: float = 0.95  # landscape: keep principal directions up to this explained variance
    max_dimensions: int = 4  # landscape: at most this many directions
    min_dimensions: int = 2  # landscape: at least this many (a motion that turns needs two)
    grid_points: int = 41  # landscape: global search points per direction
    grid_extent: float = 1.5  # landscape: grid spans the population's score range × this
    steps: int = 40
    learning_rate: float = 0.05  # Adam step: px (free) or population standard deviations (landscape)
    # free mode: "population" (Mahalanobis) or "field" (mean |Δd|², px²)
    prior: Literal["population", "field"] = "population"
    prior_weight: float = 0.001
    smooth_weight: float = 0.0
    refine_angles: bool = False
    refine_shifts: bool = False
    refine_defocus: bool = False
    angle_learning_rate: float = 0.2  # deg per step
    shift_learning_rate: float = 0.05  # px per step
    defocus_learning_rate: float = 20.0  # Å per step
    pose_prior_weight: float = 1e-4  # per deg² and px² away from the starting pose
    degree_schedule: bool = False  # free mode: l2 ≤ 1 terms first, then all terms
    free_steps: int = 0  # landscape mode: then this many steps on all 3K coefficients (leave the landscape)
    free_prior_weight: float = 0.01  # that stage: weight of mean |Δd|² (px²) away from the landscape result
    free_smooth_weight: float = 0.01  # that stage: weight of the mean roughness of the change
    # landscape: alternations of direction fit (all particles) and scoring; 0 = the network's
    population_rounds: int = 4  # 4 since z3lib 0.1.13 (was 2): every scenario of the yardstick gains
    population_epochs: int = 3  # that fit: passes over all particles per round
    population_learning_rate: float = 0.02  # that fit: Adam step (px)
    population_anneal: bool = True  # that fit: Adam's step decays to 0 over each round (cosine)
    population_batch_size: int = 64  # that fit: particles per step
    population_grid_points: int = 21  # that fit's scoring: grid points per direction
    population_joint_cells: int = 200  # rounds after the first: joint grid of ≤ this many points (0: off; 0.1.14)
    population_smooth_weight: float = 0.01  # that fit: weight of the fields' mean roughness
    posterior_mean: bool = True  # scores: posterior mean over the grid (False: the grid's best point)
    patience: int = 8
    tolerance: float = 1e-6
    batch_size: int = 256
    loss: Loss = "corr"
    mask_radius: float = 0.9

    def __post_init__(self) -> None:
        check_choices(self)

    @classmethod
    def from_config(cls, refine: Mapping[str, Any]) -> RefineConfig:
        """From the pipeline config's ``refine`` section (``chunks`` is the workflow's)."""
        return from_section(cls, refine, ignore={"chunks"})

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a plain dict."""
        return asdict(self)


@dataclass
class RefineResult:
    """Per-particle results, in the order of the ``index`` refined (px of the processing box)."""

    index: np.ndarray  # (n,) particle rows
    coefficients: np.ndarray  # (n, 3K)
    angles: np.ndarray  # (n, 3) deg
    shifts: np.ndarray  # (n, 2) px
    defocus_offset: np.ndarray  # (n,) Å added to DefocusU and DefocusV
    cost: np.ndarray  # (n,) image term (1 − corr) at the result
    cost_prior: np.ndarray  # (n,) image term at the start (the prediction, or its landscape coordinates)
    flagged: np.ndarray  # (n,) bool: kept the prediction (no improvement)
    steps: np.ndarray  # (n,) local steps until the particle stopped

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return the fields as arrays, for writing with :func:`z3lib.io.write_npz`."""
        return {k: np.asarray(v) for k, v in asdict(self).items()}


@dataclass
class Landscape:
    """The network's landscape: ``c = mean + z · directions`` (px of the processing box)."""

    mean: np.ndarray  # (3K,)
    directions: np.ndarray  # (k, 3K) orthonormal rows
    scale: np.ndarray  # (k,) standard deviation of the population's scores
    low: np.ndarray  # (k,) smallest population score
    high: np.ndarray  # (k,) largest population score

    def scores(self, coefficients: np.ndarray) -> np.ndarray:
        """``(n, 3K)`` → ``(n, k)``."""
        out: np.ndarray = (coefficients - self.mean) @ self.directions.T
        return out


def _row_blocks(coefficients: Any) -> Iterator[np.ndarray]:
    """Yield the rows of ``(n, 3K)`` coefficients in float64 blocks (:func:`z3lib.io.coefficients.row_blocks`)."""
    from z3lib.io.coefficients import row_blocks

    for block in row_blocks(coefficients):
        yield block.astype(np.float64, copy=False)


def _moments(coefficients: Any) -> tuple[int, np.ndarray, np.ndarray]:
    """Return ``n``, the mean ``(3K,)`` and the scatter matrix ``Σ (c − mean)ᵀ(c − mean)`` ``(3K, 3K)``.

    Two passes over the rows, a block at a time (the rows may be read from disk).
    """
    n, width = len(coefficients), int(coefficients.shape[1])
    mean = np.zeros(width)
    for block in _row_blocks(coefficients):
        mean += block.sum(0)
    mean /= max(n, 1)
    scatter = np.zeros((width, width))
    for block in _row_blocks(coefficients):
        centred = block - mean
        scatter += centred.T @ centred
    return n, mean, scatter


def landscape_from_predictions(
    coefficients: Any, *, variance: float = 0.95, max_dimensions: int = 4, min_dimensions: int = 1
) -> Landscape:
    """Mean and main principal directions of the predicted coefficients ``(n, 3K)``.

    The directions explaining ``variance`` of the predictions' variance, at least
    ``min_dimensions`` and at most ``max_dimensions`` (and never more than there are particles).

    ``coefficients``: an array, or a :class:`~z3lib.io.FieldRows` read from disk a block at a time
    (the principal directions come from the ``3K × 3K`` scatter matrix, so the rows are never all
    in memory). Each direction's sign is fixed: its largest component is positive.
    """
    n, mean, scatter = _moments(coefficients)
    if n < 3:
        raise ValueError("the landscape needs the predictions of at least 3 particles; use mode 'free'")
    eigenvalues, vectors = np.linalg.eigh(scatter)
    order = np.argsort(eigenvalues)[::-1][: min(n, len(eigenvalues))]
    power = np.maximum(eigenvalues[order], 0.0)
    frac = np.cumsum(power) / max(float(power.sum()), 1e-30)
    k = min(int(max_dimensions), max(int(min_dimensions), int(np.searchsorted(frac, variance)) + 1), len(power))
    dirs = vectors[:, order[:k]].T
    dirs *= np.where(dirs[np.arange(k), np.abs(dirs).argmax(1)] < 0, -1.0, 1.0)[:, None]
    total, squares = np.zeros(k), np.zeros(k)
    low, high = np.full(k, np.inf), np.full(k, -np.inf)
    for block in _row_blocks(coefficients):
        scores = (block - mean) @ dirs.T
        total += scores.sum(0)
        squares += (scores**2).sum(0)
        low, high = np.minimum(low, scores.min(0)), np.maximum(high, scores.max(0))
    std = np.sqrt(np.maximum(squares / n - (total / n) ** 2, 0.0))
    return Landscape(mean=mean, directions=dirs, scale=std + 1e-12, low=low, high=high)


def population_precision(coefficients: Any, *, floor: float = 1e-3) -> np.ndarray:
    """Inverse covariance ``(3K, 3K)`` of coefficient vectors ``(n, 3K)`` over the population.

    The covariance is regularised by ``floor`` × its mean variance on the diagonal, so that
    directions the population never explores stay finite but expensive. ``coefficients``: an
    array or a :class:`~z3lib.io.FieldRows` (read a block at a time).
    """
    if len(coefficients) < 2:
        return np.eye(int(coefficients.shape[1]))
    n, _, scatter = _moments(coefficients)
    cov = scatter / (n - 1)
    scale = max(float(np.trace(cov)) / cov.shape[0], 1e-12)
    cov += floor * scale * np.eye(cov.shape[0])
    inv: np.ndarray = np.linalg.inv(cov)
    return inv


def make_decoder(
    points: np.ndarray,
    amplitudes: np.ndarray,
    spec: zk.ZernikeSpec,
    pixel_size: float,
    device: str | torch.device = "cpu",
    roughness: Roughness = NetworkConfig.roughness,
    extras: CloudExtras | None = None,
) -> PhysicalDecoder:
    """Build the physical decoder of refinement: a fixed map, the network's roughness measure.

    Parameters
    ----------
    points, amplitudes
        ``(N, 3)`` px of the processing box and ``(N,)``: the reference point cloud.
    spec
        The Zernike3D basis on the processing box.
    pixel_size
        Å per px of the processing box.
    device
        Torch device of the decoder's buffers.
    roughness
        ``strain`` or ``gradient``: the measure of ``field_roughness`` (the network's).
    extras
        What an atomic model's cloud adds (:class:`~z3lib.network.CloudExtras`).
    """
    options = DecoderOptions(roughness=roughness, ctf_pad=NetworkConfig.ctf_pad, learn_reference=False)
    return PhysicalDecoder(
        torch.as_tensor(points, dtype=torch.float32),
        torch.as_tensor(amplitudes, dtype=torch.float32),
        spec,
        pixel_size,
        options,
        **(extras or CloudExtras()).decoder_arguments(),
    ).to(device)


def _stage_masks(n_params: int, spec: zk.ZernikeSpec, schedule: bool, free_mode: bool) -> list[np.ndarray]:
    """Which parameters are free in each stage (``(n_params,)`` bool per stage)."""
    full = np.ones(n_params, dtype=bool)
    if not (free_mode and schedule) or spec.L2 <= 1:
        return [full]
    idx = spec.indices()
    return [np.tile(idx[:, 2] <= 1, 3), full]


def _offset_defocus(ctf: CtfParams, offset: torch.Tensor) -> CtfParams:
    """Return the same CTFs with ``offset`` (``(B,)`` Å) added to DefocusU and DefocusV."""
    return CtfParams(
        ctf.defocus_u + offset,
        ctf.defocus_v + offset,
        ctf.defocus_angle,
        ctf.voltage,
        ctf.cs,
        ctf.amplitude_contrast,
        ctf.phase_shift,
        ctf.bfactor,
        ctf.scale,
    )


@dataclass(frozen=True)
class SearchState:
    """The refinement parameters of a batch of ``B`` particles.

    The field's parameters ``(B, P)`` (landscape scores in population standard deviations, or
    coefficients in px) and the pose and defocus offsets from the starting ones: angles ``(B, 3)``
    deg, shifts ``(B, 2)`` px, defocus ``(B,)`` Å (added to DefocusU and DefocusV).
    """

    params: torch.Tensor
    angles: torch.Tensor
    shifts: torch.Tensor
    defocus: torch.Tensor

    @classmethod
    def start(cls, params: torch.Tensor) -> SearchState:
        """``params`` (cloned) at the starting pose and defocus (zero offsets)."""
        b, dev = params.shape[0], params.device
        return cls(
            params.detach().clone(),
            torch.zeros(b, 3, device=dev),
            torch.zeros(b, 2, device=dev),
            torch.zeros(b, device=dev),
        )

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(params, angles, shifts, defocus)``."""
        return self.params, self.angles, self.shifts, self.defocus

    def where(self, mask: torch.Tensor, other: SearchState) -> SearchState:
        """Per particle: this state where ``mask`` (``(B,)`` bool), else ``other``."""
        return SearchState(
            *(
                torch.where(mask.view(-1, *([1] * (t.dim() - 1))), t, o)
                for t, o in zip(self.tensors(), other.tensors(), strict=True)
            )
        )

    def assign(self, other: SearchState, rows: torch.Tensor | None = None) -> None:
        """Copy ``other`` into these tensors in place (all particles, or the ``rows`` mask ``(B,)``)."""
        for t, o in zip(self.tensors(), other.tensors(), strict=True):
            if rows is None:
                t.copy_(o)
            else:
                t[rows] = o[rows]

    def detach(self) -> SearchState:
        """Return a copy of the state detached from the autograd graph."""
        return SearchState(*(t.detach() for t in self.tensors()))


class _Objective:
    """Per-particle cost of a batch.

    Parameters map to coefficients by ``origin + z · directions`` (landscape) or are the
    coefficients themselves (free).
    """

    def __init__(
        self,
        decoder: PhysicalDecoder,
        images: torch.Tensor,
        angles: torch.Tensor,
        shifts: torch.Tensor,
        ctf: CtfParams,
        prior: torch.Tensor,
        config: RefineConfig,
        *,
        landscape: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        precision: torch.Tensor | None,
        phase_flipped: bool,
        change_smooth_weight: float = 0.0,
    ) -> None:
        self.change_smooth_weight = change_smooth_weight  # weight of mean |∇(d(c) − d(prior))|²
        self.decoder, self.images, self.angles, self.shifts, self.ctf = decoder, images, angles, shifts, ctf
        self.prior, self.config, self.landscape, self.precision = prior, config, landscape, precision
        self.phase_flipped = phase_flipped
        self.mask = circle_mask(decoder.box, config.mask_radius, device=images.device)
        # the starting pose's rotations and the CTFs, computed once: every evaluation that does not
        # refine angles or defocus reuses them (the grid search alone evaluates hundreds of times)
        self.rot0 = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
        self.transfer0 = decoder.transfer(
            ctf, phase_flipped=phase_flipped, device=images.device, dtype=decoder.amplitudes.dtype
        )
        if landscape is not None:  # parameters are scores in units of the population's spread
            mean, dirs, scale = landscape
            self.prior_scores = ((prior - mean) @ dirs.T) / scale

    def coefficients(self, params: torch.Tensor) -> torch.Tensor:
        """Return the coefficients of parameters ``(B, P)``.

        In landscape mode the scores move the prediction itself along the directions
        (``prior + ((z − z_prior) · scale) · U``), so the prediction's part outside the landscape is kept
        and ``z = z_prior`` is the prediction.
        """
        if self.landscape is None:
            return params
        _, dirs, scale = self.landscape
        return self.prior + ((params - self.prior_scores) * scale) @ dirs

    def image_term(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``(B,)`` image term of given coefficients at the starting pose and defocus."""
        pred = self.decoder(coefficients, self.rot0, self.shifts, self.ctf, transfer=self.transfer0)
        return image_loss(pred, self.images, self.mask, self.config.loss)

    def __call__(
        self, params: torch.Tensor, da: torch.Tensor, ds: torch.Tensor, dd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        coeffs = self.coefficients(params)
        if cfg.refine_angles:
            ang = self.angles + da
            rot = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
        else:
            rot = self.rot0
        if cfg.refine_defocus:
            p = _offset_defocus(self.ctf, dd)
            pred = self.decoder(coeffs, rot, self.shifts + ds, p, phase_flipped=self.phase_flipped)
        else:
            pred = self.decoder(coeffs, rot, self.shifts + ds, self.ctf, transfer=self.transfer0)
        img = image_loss(pred, self.images, self.mask, cfg.loss)
        if self.landscape is not None:
            prior_term = ((params - self.prior_scores) ** 2).mean(1)
        else:
            delta = coeffs - self.prior
            if self.precision is not None:
                prior_term = torch.einsum("bi,ij,bj->b", delta, self.precision, delta) / delta.shape[1]
            else:
                prior_term = self.decoder.field_energy(delta)
        total = img + cfg.prior_weight * prior_term + cfg.pose_prior_weight * ((da**2).sum(1) + (ds**2).sum(1))
        if cfg.smooth_weight:
            total = total + cfg.smooth_weight * self.decoder.field_roughness(coeffs)
        if self.change_smooth_weight:
            total = total + self.change_smooth_weight * self.decoder.field_roughness(coeffs - self.prior)
        return total, img


def _grid_search(
    objective: _Objective, start: torch.Tensor, low: np.ndarray, high: np.ndarray, config: RefineConfig
) -> torch.Tensor:
    """Coordinate-wise global search: for each direction, the best of a grid of scores."""
    z = start.clone()
    b = z.shape[0]
    zero3 = z.new_zeros(b, 3)
    zero2 = z.new_zeros(b, 2)
    zero1 = z.new_zeros(b)
    with torch.no_grad():
        for j in range(z.shape[1]):
            mid, half = 0.5 * (low[j] + high[j]), 0.5 * (high[j] - low[j]) * config.grid_extent
            grid = np.linspace(mid - half, mid + half, config.grid_points)
            best_cost, _ = objective(z, zero3, zero2, zero1)
            best_val = z[:, j].clone()
            for g in grid:
                trial = z.clone()
                trial[:, j] = float(g)
                cost, _ = objective(trial, zero3, zero2, zero1)
                better = cost < best_cost
                best_cost = torch.where(better, cost, best_cost)
                best_val = torch.where(better, trial[:, j], best_val)
            z[:, j] = best_val
    return z


def _landscape_tensors(
    landscape: Landscape | None, config: RefineConfig, prior: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Return the landscape's mean, directions and scales as tensors like ``prior`` (landscape mode; else None)."""
    if config.mode != "landscape":
        return None
    if landscape is None:
        raise ValueError("landscape mode needs the landscape of the network's predictions")
    mean, directions, scale = (
        torch.as_tensor(a, dtype=prior.dtype, device=prior.device)
        for a in (landscape.mean, landscape.directions, landscape.scale)
    )
    return mean, directions, scale


def _batch_results(
    prior: torch.Tensor,
    angles: torch.Tensor,
    shifts: torch.Tensor,
    coeffs: torch.Tensor,
    best: SearchState,
    flagged: torch.Tensor,
    prior_img: torch.Tensor,
    final_img: torch.Tensor,
    steps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Return the columns of :func:`refine_batch`: a ``flagged`` particle keeps its start and cost."""
    fm = flagged[:, None]
    return {
        "coefficients": torch.where(fm, prior, coeffs).detach(),
        "angles": (angles + torch.where(fm, torch.zeros_like(best.angles), best.angles)).detach(),
        "shifts": (shifts + torch.where(fm, torch.zeros_like(best.shifts), best.shifts)).detach(),
        "defocus_offset": torch.where(flagged, torch.zeros_like(best.defocus), best.defocus).detach(),
        "cost": torch.where(flagged, prior_img, final_img).detach(),
        "cost_prior": prior_img.detach(),
        "flagged": flagged.detach(),
        "steps": steps.detach(),
    }


def refine_batch(
    decoder: PhysicalDecoder,
    images: torch.Tensor,
    angles: torch.Tensor,
    shifts: torch.Tensor,
    ctf: CtfParams,
    prior: torch.Tensor,
    config: RefineConfig,
    *,
    landscape: Landscape | None = None,
    precision: torch.Tensor | None = None,
    phase_flipped: bool = False,
    fitted: bool = False,
) -> dict[str, torch.Tensor]:
    """Refine one batch of particles together (each with its own parameters and stopping).

    Parameters
    ----------
    decoder
        Physical decoder of the reference (px of the processing box).
    images
        ``(B, N, N)`` normalised particle images.
    angles, shifts
        ``(B, 3)`` deg and ``(B, 2)`` px starting poses.
    ctf
        ``B`` CTF parameter sets.
    prior
        ``(B, 3K)`` the network's coefficients (px): start and prior.
    config
        The refinement settings (the basis is the decoder's).
    landscape
        required in ``"landscape"`` mode (see :func:`landscape_from_predictions`).
    precision
        ``(3K, 3K)`` population precision for the free mode's Mahalanobis prior (None: field prior).
    phase_flipped
        The images are phase-flipped (the decoder applies ``|CTF|``).
    fitted
        ``prior`` holds the population fit's coefficients on ``landscape``
        (:func:`z3lib.population.fit_population`: each particle's posterior mean already): no grid
        search, and the local search runs only where poses or defocus are refined (on the scores,
        it would only move them to the single image's noisier maximum); the free stage as set.

    Returns
    -------
    dict of ``(B, …)`` tensors: coefficients, angles, shifts, defocus_offset, cost, cost_prior,
    flagged, steps.
    """
    land_t = _landscape_tensors(landscape, config, prior)
    objective = _Objective(
        decoder,
        images,
        angles,
        shifts,
        ctf,
        prior,
        config,
        landscape=land_t,
        precision=precision if config.mode == "free" else None,
        phase_flipped=phase_flipped,
    )
    with torch.no_grad():  # the baseline every particle must beat: its start (prediction or population fit)
        prior_img = objective.image_term(prior)
    if land_t is not None and not fitted:
        assert landscape is not None
        start = _grid_search(
            objective, objective.prior_scores, landscape.low / landscape.scale, landscape.high / landscape.scale, config
        )
    else:
        start = objective.prior_scores.clone() if land_t is not None else prior.clone()
    stages = _stage_masks(start.shape[1], decoder.spec, config.degree_schedule, config.mode == "free")
    local = not fitted or config.refine_angles or config.refine_shifts or config.refine_defocus
    best, steps = _local_search(objective, start, stages, config.steps if local else 0, config)
    searched = local or config.free_steps > 0
    with torch.no_grad():
        coeffs = objective.coefficients(best.params)
    if land_t is not None and config.free_steps > 0:
        coeffs, free_n = _free_stage(decoder, images, angles, shifts, ctf, coeffs, best, config, phase_flipped)
        steps = steps + free_n
    with torch.no_grad():
        final_img = _image_term_at(objective, coeffs, best)
    flagged = ~(final_img < prior_img - config.tolerance)
    if not searched:  # nothing to improve on: the population fit is the result
        flagged = torch.zeros_like(flagged)
    return _batch_results(prior, angles, shifts, coeffs, best, flagged, prior_img, final_img, steps)


def _free_stage(
    decoder: PhysicalDecoder,
    images: torch.Tensor,
    angles: torch.Tensor,
    shifts: torch.Tensor,
    ctf: CtfParams,
    coeffs: torch.Tensor,
    best: SearchState,
    config: RefineConfig,
    phase_flipped: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave the landscape where the image says so: refine all 3K coefficients from the landscape result.

    The search starts from ``coeffs`` ``(B, 3K)`` at the landscape result's pose and defocus
    (``best``), under a prior on the size and roughness of the change. Returns the coefficients
    ``(B, 3K)`` and the steps taken ``(B,)``.
    """
    free_cfg = replace(
        config,
        mode="free",
        prior="field",
        prior_weight=config.free_prior_weight,
        smooth_weight=0.0,
        refine_angles=False,
        refine_shifts=False,
        refine_defocus=False,
    )
    ctf2 = _offset_defocus(ctf, best.defocus)
    free_obj = _Objective(
        decoder,
        images,
        angles + best.angles,
        shifts + best.shifts,
        ctf2,
        coeffs,
        free_cfg,
        landscape=None,
        precision=None,
        phase_flipped=phase_flipped,
        change_smooth_weight=config.free_smooth_weight,
    )
    free_best, free_n = _local_search(
        free_obj, coeffs, [np.ones(coeffs.shape[1], dtype=bool)], config.free_steps, free_cfg
    )
    return free_best.params, free_n


def _image_term_at(objective: _Objective, coefficients: torch.Tensor, best: SearchState) -> torch.Tensor:
    """``(B,)`` image term of ``coefficients`` at the refined pose and defocus of ``best``."""
    cfg = objective.config
    if not (cfg.refine_angles or cfg.refine_shifts or cfg.refine_defocus):
        return objective.image_term(coefficients)
    ang = objective.angles + best.angles
    rot = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]) if cfg.refine_angles else objective.rot0
    c = objective.ctf
    if cfg.refine_defocus:
        ctf = _offset_defocus(c, best.defocus)
        pred = objective.decoder(
            coefficients, rot, objective.shifts + best.shifts, ctf, phase_flipped=objective.phase_flipped
        )
    else:
        pred = objective.decoder(coefficients, rot, objective.shifts + best.shifts, c, transfer=objective.transfer0)
    return image_loss(pred, objective.images, objective.mask, cfg.loss)


def _local_search(
    objective: _Objective, start: torch.Tensor, stages: list[np.ndarray], steps_total: int, config: RefineConfig
) -> tuple[SearchState, torch.Tensor]:
    """Run per-particle Adam from ``start`` (``(B, P)`` parameters), each particle stopping on its own.

    A particle stops after ``config.patience`` steps without improvement; ``stages`` are the free
    parameters of successive stages (each restarts from the best point). Returns the best
    :class:`SearchState` (parameters and pose/defocus offsets) and the steps taken ``(B,)``.
    """
    device = start.device
    b = start.shape[0]
    best = SearchState.start(start)
    current = SearchState(*(t.clone().requires_grad_(True) for t in best.tensors()))
    params, d_ang, d_shift, d_def = current.tensors()
    groups = [{"params": [params], "lr": config.learning_rate}]
    if config.refine_angles:
        groups.append({"params": [d_ang], "lr": config.angle_learning_rate})
    if config.refine_shifts:
        groups.append({"params": [d_shift], "lr": config.shift_learning_rate})
    if config.refine_defocus:
        groups.append({"params": [d_def], "lr": config.defocus_learning_rate})
    opt = torch.optim.Adam(groups)
    with torch.no_grad():
        best_total, _ = objective(*current.tensors())
    active = torch.ones(b, dtype=torch.bool, device=device)
    since = torch.zeros(b, dtype=torch.long, device=device)
    steps = torch.zeros(b, dtype=torch.long, device=device)
    per_stage = max(1, steps_total // len(stages)) if steps_total > 0 else 0
    for s_i, free in enumerate(stages):
        free_t = torch.as_tensor(free, device=device, dtype=params.dtype)
        if s_i > 0:  # a new stage restarts every particle from its best point
            active[:] = True
            since[:] = 0
            with torch.no_grad():
                current.assign(best)
        for _ in range(per_stage):
            if not bool(active.any()):
                break
            total, _ = objective(*current.tensors())
            opt.zero_grad(set_to_none=True)
            total.sum().backward()  # type: ignore[no-untyped-call]
            with torch.no_grad():
                keep = active.to(params.dtype)
                assert params.grad is not None
                params.grad *= keep[:, None] * free_t[None, :]
                for t in (d_ang, d_shift, d_def):
                    if t.grad is not None:
                        t.grad *= keep.view(-1, *([1] * (t.dim() - 1)))
                better = active & (total < best_total - config.tolerance)
                best_total = torch.where(better, total, best_total)
                best = current.where(better, best)
                since = torch.where(better, torch.zeros_like(since), since + 1)
                steps += active.long()
                active &= since < config.patience
            opt.step()
            with torch.no_grad():  # frozen particles must not drift through Adam's momentum
                inactive = ~active
                if bool(inactive.any()):
                    current.assign(best, inactive)
    return best.detach(), steps
