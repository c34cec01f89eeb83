"""The population's landscape: shared directions refitted to all images, posterior-mean scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from z3lib import zernike as zk
from z3lib.ctf import CtfParams
from z3lib.decoder import DecoderOptions, PhysicalDecoder
from z3lib.geometry import euler_to_matrix, points_from_volume
from z3lib.io import Z3InputError, read_npz, write_coefficients
from z3lib.population import fit_population, posterior_mean_scores, read_population
from z3lib.refine import RefineConfig, landscape_from_predictions, refine_batch
from z3lib.stages.preprocess import preprocess
from z3lib.stages.refine import refine_chunk, refine_landscape
from z3lib.stages.simulate import simulate_dataset
from z3lib.training import ParticleBatchSource

ADK = Path(__file__).parent / "data" / "mdanalysistests_adk"
BOX = 32
DEGREES = (2, 1)


class _ArrayStack:
    """Images in memory with the two things a :class:`ParticleBatchSource` reads of a stack."""

    def __init__(self, images: np.ndarray) -> None:
        self.data = images.astype(np.float32)
        self.box = images.shape[-1]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.data[rows]

    def close(self) -> None:
        pass


def _phantom_decoder() -> PhysicalDecoder:
    """A textured phantom (Gaussian blobs at several depths) as a point cloud, float32."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.arange(BOX) - BOX // 2] * 3, indexing="ij")
    vol = np.zeros((BOX,) * 3)
    for _ in range(10):
        c = rng.uniform(-8, 8, 3)
        vol += np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2) / (2 * 1.8**2))
    pts, amps = points_from_volume(vol, mask=vol > 0.05)
    options = DecoderOptions(roughness="strain", ctf_pad=1, learn_reference=False)
    return PhysicalDecoder(
        torch.tensor(pts, dtype=torch.float32),
        torch.tensor(amps, dtype=torch.float32),
        zk.ZernikeSpec(DEGREES[0], DEGREES[1], "xmipp", BOX),
        2.0,
        options,
    )


def test_posterior_mean_of_a_gaussian_likelihood() -> None:
    """Costs made from a known Gaussian likelihood (−log L = (z − z₀)²/2s² for each particle, z₀
    spread evenly over the grid, so that the population's prior comes out flat): the posterior
    means are z₀ and the posterior standard deviations s, for particles away from the grid's ends."""
    grid = np.linspace(-3, 3, 121)
    z0 = np.linspace(-3, 3, 400)
    s, n_pixels = 0.25, 1000.0
    nll = (grid[None, :] - z0[:, None]) ** 2 / (2 * s**2)
    # invert −log L = (N/2)·log(1 − corr²) + const for the correlation, then cost = 1 − corr
    corr = np.sqrt(1.0 - np.exp(2.0 * (nll - nll.max()) / n_pixels) * (1 - 0.3**2))
    mean, sd = posterior_mean_scores(1.0 - corr, grid, n_pixels)
    inner = np.abs(z0) < 2.0
    np.testing.assert_allclose(mean[inner], z0[inner], atol=0.02)
    np.testing.assert_allclose(sd[inner], s, rtol=0.1)  # EM's prior sharpens a little towards its NPMLE


def _images_of(
    dec: PhysicalDecoder, true: np.ndarray, rng: np.random.Generator, noise: float
) -> tuple[ParticleBatchSource, np.ndarray, CtfParams]:
    """Noisy images (unit signal variance) of fields ``true`` ``(n, 3K)`` at random poses."""
    n = len(true)
    angles = np.column_stack([rng.uniform(-180, 180, n), rng.uniform(20, 160, n), rng.uniform(-180, 180, n)])
    ctf = CtfParams.create(np.full(n, 15000.0), np.full(n, 14000.0), 20.0)
    rot = euler_to_matrix(torch.tensor(angles[:, 0]), torch.tensor(angles[:, 1]), torch.tensor(angles[:, 2])).float()
    with torch.no_grad():
        clean = dec(torch.tensor(true, dtype=torch.float32), rot, torch.zeros(n, 2), ctf).numpy()
    clean /= clean.std(axis=(1, 2), keepdims=True)
    images = clean + rng.normal(scale=noise, size=clean.shape)
    source = ParticleBatchSource(
        images=_ArrayStack(images),
        angles=torch.tensor(angles, dtype=torch.float32),  # type: ignore[arg-type]
        shifts=torch.zeros(n, 2),
        ctf=ctf,
        pixel_size=2.0,
    )
    return source, angles, ctf


def _noisy_motion(n: int, seed: int, noise: float) -> dict[str, object]:
    """``n`` noisy images of one shared motion ``t · direction`` (``t`` uniform in [−1, 1]), and
    predictions that, like a network at low SNR, shrink it 3× and mix in a spurious direction."""
    dec = _phantom_decoder()
    rng = np.random.default_rng(seed)
    k3 = 3 * zk.count_terms(*DEGREES)
    direction = rng.normal(size=k3)
    direction *= 2.0 / np.linalg.norm(direction)
    spurious = rng.normal(size=k3)
    spurious -= (spurious @ direction) / (direction @ direction) * direction
    spurious *= 0.7 / np.linalg.norm(spurious)
    t = rng.uniform(-1, 1, n)
    true = np.outer(t, direction)
    source, angles, ctf = _images_of(dec, true, rng, noise)
    t_seen = t + rng.normal(scale=0.3, size=n)  # the encoder's error
    prediction = np.outer(t_seen, direction / 3 + spurious) + rng.normal(scale=0.05, size=(n, k3))
    return {"decoder": dec, "source": source, "true": true, "prediction": prediction, "angles": angles, "ctf": ctf}


def _field_rms(dec: PhysicalDecoder, coefficients: np.ndarray, true: np.ndarray) -> float:
    z = dec.basis.double().numpy()
    d = np.einsum("nk,bak->bna", z, (coefficients - true).reshape(len(true), 3, -1))
    return float(np.sqrt((d**2).sum(-1).mean()))


def test_population_fit_recovers_the_direction_a_shrunk_prediction_got_wrong() -> None:
    """Images of one motion at SNR ≈ 1, predictions shrunk 3× and mixed with a spurious motion:
    refinement along the predictions' own direction cannot leave it; the population fit finds the
    true direction and amplitude (field error well below both) and orders the particles by it."""
    data = _noisy_motion(100, 3, noise=1.0)
    dec, source, true, prediction = data["decoder"], data["source"], data["true"], data["prediction"]
    assert isinstance(dec, PhysicalDecoder) and isinstance(source, ParticleBatchSource)
    assert isinstance(true, np.ndarray) and isinstance(prediction, np.ndarray)
    cfg = RefineConfig(
        max_dimensions=1,
        population_grid_points=21,
        population_rounds=2,
        population_epochs=10,
        population_learning_rate=0.05,
        population_batch_size=32,
        population_smooth_weight=0.0,
        batch_size=100,
    )
    fit = fit_population(dec, source, prediction, cfg)
    # the old landscape refinement: grid + local search along the predictions' direction
    land = landscape_from_predictions(prediction, variance=0.95, max_dimensions=1)
    b = source.batch(np.arange(len(source)), torch.device("cpu"))
    old = refine_batch(
        dec,
        b.images,
        b.angles,
        b.shifts,
        b.ctf,
        torch.tensor(prediction, dtype=torch.float32),
        RefineConfig(grid_points=21, steps=20),
        landscape=land,
    )["coefficients"].numpy()
    errors = {
        name: _field_rms(dec, c, true)
        for name, c in (("prediction", prediction), ("old", old), ("population", fit.coefficients), ("zero", 0 * true))
    }
    assert errors["population"] < 0.5 * errors["old"], errors
    assert errors["population"] < 0.35 * errors["zero"], errors
    u = fit.landscape.directions[0]
    unit = true[-1] / np.linalg.norm(true[-1])
    assert abs(float(u @ unit)) > 0.95, float(u @ unit)
    t = true @ unit
    assert abs(np.corrcoef(fit.scores[:, 0], t)[0, 1]) > 0.9
    np.testing.assert_allclose(fit.coefficients, fit.landscape.mean + fit.scores @ fit.landscape.directions, atol=1e-9)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("population")
    sim = simulate_dataset(
        root / "sim",
        start_model=ADK / "adk_closed.pdb",
        end_model=ADK / "adk_open.pdb",
        n_particles=48,
        box=32,
        pixel_size=4.0,
        resolution=10.0,
        snr=1.0,
        seed=4,
    )
    pre = preprocess(sim["particles"], sim["reference"], sim["mask"], root / "pre", box=24)
    rng = np.random.default_rng(5)
    coeffs = np.outer(rng.uniform(-1, 1, 48), rng.normal(size=39)) + 0.05 * rng.normal(size=(48, 39))
    write_coefficients(root / "prior.npy", coeffs)
    return {"particles": pre["particles"], "points": pre["points"], "prior": root / "prior.npy", "root": root}


@pytest.mark.parametrize("halves", [False, True])
def test_chunks_start_from_the_population_landscape(small_run: dict[str, Path], halves: bool) -> None:
    """refine_landscape writes one fit (or one per gold-standard half, each over its own
    particles only); a chunk given it returns each particle's fitted coefficients (no local
    stage to run: nothing flagged); a fit of other particles is refused by name."""
    root = small_run["root"] / ("halves" if halves else "shared")
    cfg = RefineConfig(population_grid_points=5, batch_size=16, population_rounds=1, population_epochs=1)
    kw = {"zernike": {"L1": 3, "L2": 2, "basis": "xmipp"}, "config": cfg, "independent_halves": halves}
    outs = [root / f"landscape_half{h}.npz" for h in (1, 2)] if halves else [root / "landscape.npz"]
    refine_landscape(small_run["particles"], small_run["points"], small_run["prior"], outs, **kw)  # type: ignore[arg-type]
    rows = np.concatenate([read_npz(p)["rows"] for p in outs])
    np.testing.assert_array_equal(np.sort(rows), np.arange(48))
    chunk = refine_chunk(
        small_run["particles"],
        small_run["points"],
        small_run["prior"],
        root / "chunk.npz",
        chunk=0,
        n_chunks=1,
        landscapes=outs,
        **kw,
    )  # type: ignore[arg-type]
    result = read_npz(chunk)
    fitted = np.zeros((48, 39))
    for path in outs:
        _, coeffs = read_population(path)
        fitted[read_npz(path)["rows"]] = coeffs
    # the chunk writes px of the original box (32), the fits hold px of the processing box (24)
    np.testing.assert_allclose(result["coefficients"], zk.rescale_coefficients(fitted, 24, 32), atol=1e-5)
    assert not result["flagged"].any()
    if halves:  # one half's fit alone does not cover the particles
        with pytest.raises(Z3InputError, match="cover 24 of 48 particles"):
            refine_chunk(
                small_run["particles"],
                small_run["points"],
                small_run["prior"],
                root / "bad.npz",
                chunk=0,
                n_chunks=1,
                landscapes=outs[:1],
                **kw,
            )  # type: ignore[arg-type]
    np.savez(root / "not_a_landscape.npz", rows=np.arange(48))
    with pytest.raises(Z3InputError, match="not a population landscape"):
        read_population(root / "not_a_landscape.npz")


def test_annealed_direction_fit_settles_nearer_the_true_field() -> None:
    """At low SNR the summed image loss is nearly flat around the best direction, and Adam at a
    constant step keeps moving every coefficient by about that step from batch to batch, so the
    fit ends wherever the last batches left it; with the step annealed to zero over each round
    (``population_anneal``) it settles. Judged against the known true fields."""
    data = _noisy_motion(200, 7, noise=1.5)
    dec, source, true, prediction = data["decoder"], data["source"], data["true"], data["prediction"]
    assert isinstance(dec, PhysicalDecoder) and isinstance(source, ParticleBatchSource)
    assert isinstance(true, np.ndarray) and isinstance(prediction, np.ndarray)
    error = {}
    for anneal in (False, True):
        cfg = RefineConfig(
            max_dimensions=1,
            population_grid_points=21,
            population_rounds=2,
            population_epochs=6,
            population_learning_rate=0.2,
            population_batch_size=16,
            population_smooth_weight=0.0,
            population_anneal=anneal,
            batch_size=200,
        )
        error[anneal] = _field_rms(dec, fit_population(dec, source, prediction, cfg).coefficients, true)
    assert error[True] < 0.92 * error[False], error  # measured 0.177 against 0.204
    assert error[True] < 0.55 * _field_rms(dec, 0 * true, true), error  # zero field 0.367


def test_direction_refit_never_raises_the_population_objective() -> None:
    """Noise-free images of one motion, the fit started at the exact truth (the mean field zero,
    the true direction, every particle's true score): the image loss there is 0, the global
    minimum, so any step can only raise it. Adam's first steps move every coefficient by about
    its learning rate whatever the gradient, so the refit comes back worse, and it must be
    refused: the truth is kept bit for bit. Started off the truth, the refit is kept and lowers
    the loss (the guard does not simply freeze the fit)."""
    from z3lib.decoder import circle_mask, image_loss
    from z3lib.population import fit_directions

    data = _noisy_motion(64, 11, noise=0.0)
    dec, source, true = data["decoder"], data["source"], data["true"]
    assert isinstance(dec, PhysicalDecoder) and isinstance(source, ParticleBatchSource)
    assert isinstance(true, np.ndarray)
    direction = true[np.argmax(np.abs(true[:, 0]))]
    scores = (true @ direction / (direction @ direction))[:, None]
    cfg = RefineConfig(
        population_epochs=2, population_learning_rate=0.1, population_batch_size=16, population_smooth_weight=0.0
    )
    mask = circle_mask(BOX, cfg.mask_radius)

    def loss(mean: torch.Tensor, dirs: torch.Tensor) -> float:
        b = source.batch(np.arange(len(source)), torch.device("cpu"))
        coeffs = mean[None] + torch.as_tensor(scores, dtype=torch.float32) @ dirs
        with torch.no_grad():
            pred = dec(coeffs, euler_to_matrix(b.angles[:, 0], b.angles[:, 1], b.angles[:, 2]), b.shifts, b.ctf)
        return float(image_loss(pred, b.images, mask, "corr").mean())

    mean = torch.zeros(direction.shape, dtype=torch.float32)
    dirs = torch.tensor(direction[None], dtype=torch.float32)
    start = loss(mean, dirs)
    assert start < 1e-4  # the exact model: the images are its projections
    kept = fit_directions(dec, source, mean, dirs, scores, cfg, device=torch.device("cpu"))
    assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(dirs, torch.tensor(direction[None]).float())
    assert kept == pytest.approx(start, abs=1e-6)

    rng = np.random.default_rng(2)
    off = torch.tensor(direction[None] + 0.4 * rng.normal(size=direction.shape), dtype=torch.float32)
    dirs = off.clone()
    before = loss(mean, dirs)
    after = fit_directions(dec, source, mean, dirs, scores, cfg, device=torch.device("cpu"))
    assert not torch.equal(dirs, off) and after < 0.5 * before, (before, after)


def test_posterior_mean_on_a_joint_grid_of_a_gaussian_likelihood() -> None:
    """The 2-D analogue of the Gaussian check: particles spread evenly over a plane, an isotropic
    Gaussian likelihood of width s around each one's z₀ on a joint 2-D grid: the posterior means
    are z₀ in both coordinates and the posterior standard deviations s, away from the edges."""
    axis = np.linspace(-3, 3, 41)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    side = np.linspace(-3, 3, 25)
    z0 = np.stack(np.meshgrid(side, side, indexing="ij"), -1).reshape(-1, 2)
    s, n_pixels = 0.3, 1000.0
    nll = ((grid[None] - z0[:, None]) ** 2).sum(-1) / (2 * s**2)
    corr = np.sqrt(1.0 - np.exp(2.0 * (nll - nll.max()) / n_pixels) * (1 - 0.3**2))
    mean, sd = posterior_mean_scores(1.0 - corr, grid, n_pixels)
    assert mean.shape == (len(z0), 2) and sd.shape == (len(z0), 2)
    inner = (np.abs(z0) < 2.0).all(axis=1)
    np.testing.assert_allclose(mean[inner], z0[inner], atol=0.03)
    np.testing.assert_allclose(sd[inner], s, rtol=0.15)


def test_a_joint_prior_follows_a_curved_population() -> None:
    """Particles on a parabola in a 2-D score plane, each seen through a Gaussian likelihood of
    width s (analytic costs): with the joint histogram as prior the posterior means fall back
    onto the curve, while one coordinate at a time (each with its own histogram, the other
    coordinate at its best estimate) cannot know the curve. Error against the true positions."""
    rng = np.random.default_rng(1)
    t = rng.uniform(-1.5, 1.5, 1500)
    z0 = np.column_stack([t, t**2 - 0.75])
    s, n_pixels = 0.2, 1000.0
    seen = z0 + rng.normal(scale=s, size=z0.shape)  # where each particle's likelihood peaks

    def costs(nll: np.ndarray) -> np.ndarray:
        return 1.0 - np.sqrt(1.0 - np.exp(2.0 * (nll - nll.max()) / n_pixels) * (1 - 0.3**2))

    axis = np.linspace(-2.5, 2.5, 41)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    joint, _ = posterior_mean_scores(costs(((grid[None] - seen[:, None]) ** 2).sum(-1) / (2 * s**2)), grid, n_pixels)
    single = np.column_stack(
        [posterior_mean_scores(costs((axis[None] - seen[:, [j]]) ** 2 / (2 * s**2)), axis, n_pixels)[0] for j in (0, 1)]
    )
    error = {name: float(np.sqrt(((z - z0) ** 2).sum(1).mean())) for name, z in (("joint", joint), ("single", single))}
    assert error["joint"] < 0.88 * error["single"], error  # measured 0.205 against 0.259


def test_joint_grid_keeps_the_cells_the_population_occupies() -> None:
    """Scores on a curve: the joint grid spans the scores' range × extent, keeps every occupied
    cell and its neighbours (each particle's nearest grid point is within one cell), far fewer
    than the full grid; a tighter cap makes it coarser, and one that no grid fits gives None."""
    from z3lib.population import JOINT_MIN_POINTS, joint_grid

    t = np.linspace(-1, 1, 300)
    scores = np.column_stack([t, np.sin(3 * t)])
    grid = joint_grid(scores, 21, 1.5, 400)
    assert grid is not None and grid.shape[1] == 2
    assert len(grid) < 0.6 * 21**2
    step = 1.5 * np.ptp(scores, 0) / 20
    cells = (grid - (scores.min(0) - 0.25 * np.ptp(scores, 0))) / step  # on the lattice over range × 1.5
    np.testing.assert_allclose(cells, np.rint(cells), atol=1e-6)
    assert (cells > -1e-6).all() and (cells < 20 + 1e-6).all()
    nearest = np.abs(scores[:, None] - grid[None]) / step  # (n, M, 2) in cells
    assert (nearest.max(-1).min(1) <= 0.5 + 1e-9).all()
    coarse = joint_grid(scores, 21, 1.5, len(grid) - 1)
    assert coarse is not None and len(coarse) < len(grid)
    assert len(np.unique(coarse[:, 0])) < 21
    assert joint_grid(scores, 21, 1.5, JOINT_MIN_POINTS - 1) is None


def test_deformed_cloud_projection_equals_the_decoder() -> None:
    """A field shared by a batch applied to the cloud once and projected at every pose, each
    particle's own field added as image-plane offsets (the scoring's path), gives the images the
    decoder gives for the sum of the two fields at each pose."""
    dec = _phantom_decoder()
    rng = np.random.default_rng(3)
    k3 = 3 * zk.count_terms(*DEGREES)
    field = torch.tensor(rng.normal(scale=0.8, size=k3), dtype=torch.float32)
    n = 6
    own = torch.tensor(rng.normal(scale=0.5, size=(n, k3)), dtype=torch.float32)
    angles = torch.tensor(rng.uniform(-180, 180, size=(n, 3)), dtype=torch.float32)
    rot = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]).float()
    shifts = torch.tensor(rng.normal(size=(n, 2)), dtype=torch.float32)
    ctf = CtfParams.create(np.full(n, 15000.0), np.full(n, 14000.0), 20.0)
    with torch.no_grad():
        want = dec(field[None] + own, rot, shifts, ctf)
        transfer = dec.transfer(ctf)
        cloud = dec.deformed_points(field[None])[0]
        got = dec.project_points(cloud, rot, shifts, transfer, offsets=dec.field_offsets(own, rot))
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4 * float(want.abs().max()))


def test_joint_scoring_follows_a_curved_motion_better_than_one_direction_at_a_time() -> None:
    """Noisy images of a motion that turns (its second direction's score is the square of the
    first's), scored along the two known directions from the same rough start: on the joint grid
    of the cells the start occupies, the population's joint histogram as prior, the fields come
    out nearer the truth than scoring one direction at a time."""
    from z3lib.population import joint_grid, score_particles, score_particles_joint

    dec = _phantom_decoder()
    rng = np.random.default_rng(8)
    k3 = 3 * zk.count_terms(*DEGREES)
    dirs = rng.normal(size=(2, k3))
    dirs *= 1.5 / np.linalg.norm(dirs, axis=1, keepdims=True)
    t = rng.uniform(-1, 1, 240)
    z_true = np.column_stack([t, 2 * t**2 - 2 / 3])
    true = z_true @ dirs
    source, _, _ = _images_of(dec, true, rng, noise=1.0)
    start = z_true + rng.normal(scale=0.3, size=z_true.shape)
    cfg = RefineConfig(population_grid_points=15, batch_size=120)
    mean, d = torch.zeros(k3), torch.tensor(dirs, dtype=torch.float32)
    cpu = torch.device("cpu")
    single, _ = score_particles(dec, source, mean, d, start, cfg, device=cpu)
    grid = joint_grid(start, 15, cfg.grid_extent, 400)
    assert grid is not None
    joint, _ = score_particles_joint(dec, source, mean, d, start, [0, 1], grid, cfg, device=cpu)
    error = {name: _field_rms(dec, z @ dirs, true) for name, z in (("joint", joint), ("single", single))}
    assert error["joint"] < 0.9 * error["single"], error  # measured 0.117 against 0.143


def test_joint_block_takes_the_directions_that_move() -> None:
    """Four directions, two of which carry the motion (a curve) and two almost nothing (their
    fields spread under a tenth of the largest): the joint grid is over the two that move; with
    one moving direction, or a cap no two-direction grid fits, there is no joint block."""
    from z3lib.population import joint_block

    rng = np.random.default_rng(0)
    t = rng.uniform(-1, 1, 500)
    scores = np.column_stack([0.02 * rng.normal(size=500), t, 0.01 * rng.normal(size=500), t**2])
    lengths = np.array([1.0, 2.0, 1.5, 3.0])
    chosen = joint_block(scores, lengths, 21, 1.5, 200)
    assert chosen is not None
    block, grid = chosen
    assert block == [1, 3] and grid.shape[1] == 2 and len(grid) <= 200
    alone = scores.copy()
    alone[:, 3] = 0.001 * rng.normal(size=500)
    assert joint_block(alone, lengths, 21, 1.5, 200) is None
    assert joint_block(scores, lengths, 21, 1.5, 20) is None
