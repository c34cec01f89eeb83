"""Classical refinement: recovery of known fields and poses, flags, chunks (resume: test_refine_resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from z3lib import zernike as zk
from z3lib.ctf import CtfParams
from z3lib.decoder import PhysicalDecoder
from z3lib.geometry import euler_to_matrix, points_from_volume
from z3lib.io import read_coefficients, read_star_blocks, write_coefficients
from z3lib.network import NetworkConfig
from z3lib.refine import RefineConfig, landscape_from_predictions, refine_batch
from z3lib.refine_run import chunk_rows
from z3lib.stages.preprocess import preprocess
from z3lib.stages.refine import gather_refined, refine_chunk
from z3lib.stages.simulate import simulate_dataset

ADK = Path(__file__).parent / "data" / "mdanalysistests_adk"
BOX = 32
ZERNIKE_32 = {"L1": 3, "L2": 2, "basis": "xmipp"}  # the config's zernike section


def _phantom_decoder(degrees: tuple[int, int] = (2, 1)) -> PhysicalDecoder:
    """A textured phantom (Gaussian blobs at several depths) as a point cloud."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.arange(BOX) - BOX // 2] * 3, indexing="ij")
    vol = np.zeros((BOX,) * 3)
    for _ in range(8):
        c = rng.uniform(-8, 8, 3)
        vol += np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2) / (2 * 1.8**2))
    pts, amps = points_from_volume(vol, mask=vol > 0.05)
    cfg = NetworkConfig(learn_reference=False)
    spec = zk.ZernikeSpec(degrees[0], degrees[1], "xmipp", BOX)
    return PhysicalDecoder(torch.tensor(pts), torch.tensor(amps), spec, 2.0, cfg).double()


def _ctf(n: int) -> CtfParams:
    return CtfParams.create(np.full(n, 15000.0), np.full(n, 14000.0), 20.0, dtype=torch.float64)


def _inplane_field(dec: PhysicalDecoder, c: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    d = zk.deformation_field(dec.basis.double(), c)  # (B, N, 3)
    return torch.einsum("bij,bnj->bni", rot[:, :2, :], d)


def test_known_field_recovered_from_perturbed_start() -> None:
    """Noise-free images of a known field: the in-plane field (what one image determines) is
    recovered from a start 1 px away."""
    dec = _phantom_decoder()
    k3 = 3 * zk.count_terms(2, 1)
    rng = np.random.default_rng(1)
    angles = torch.tensor([[0.0, 0.0, 0.0], [30.0, 60.0, -20.0], [100.0, 120.0, 45.0]], dtype=torch.float64)
    rot = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    shifts = torch.zeros(3, 2, dtype=torch.float64)
    true = torch.tensor(rng.normal(scale=0.8, size=(3, k3)))
    images = dec(true, rot, shifts, _ctf(3))
    start = true + torch.tensor(rng.normal(scale=0.8, size=(3, k3)))
    cfg = RefineConfig(mode="free", prior="field", prior_weight=0.0, steps=400, learning_rate=0.02, patience=50)
    out = refine_batch(dec, images, angles, shifts, _ctf(3), start, cfg)
    err_start = (_inplane_field(dec, start, rot) - _inplane_field(dec, true, rot)).pow(2).sum(-1).mean().sqrt()
    diff = _inplane_field(dec, out["coefficients"], rot) - _inplane_field(dec, true, rot)
    err_end = diff.pow(2).sum(-1).mean().sqrt()
    assert float(err_start) > 0.5
    assert float(err_end) < 0.1 * float(err_start), (float(err_start), float(err_end))
    assert not bool(out["flagged"].any()) and torch.all(out["cost"] < out["cost_prior"])


def test_pose_refinement_recovers_angle_and_shift_errors() -> None:
    dec = _phantom_decoder()
    k3 = 3 * zk.count_terms(2, 1)
    true_ang = torch.tensor([[40.0, 70.0, 10.0], [-60.0, 110.0, 150.0]], dtype=torch.float64)
    true_shift = torch.tensor([[0.8, -0.4], [-1.2, 0.5]], dtype=torch.float64)
    c = torch.zeros(2, k3, dtype=torch.float64)
    rot = euler_to_matrix(true_ang[:, 0], true_ang[:, 1], true_ang[:, 2])
    images = dec(c, rot, true_shift, _ctf(2))
    d_ang = torch.tensor([[2.0, -1.5, 1.0], [-1.0, 2.0, -2.0]], dtype=torch.float64)
    d_shift = torch.tensor([[0.6, -0.5], [-0.4, 0.7]], dtype=torch.float64)
    cfg = RefineConfig(
        mode="free",
        prior="field",
        prior_weight=1e3,
        steps=300,
        learning_rate=1e-9,
        refine_angles=True,
        refine_shifts=True,
        angle_learning_rate=0.1,
        shift_learning_rate=0.02,
        patience=40,
        pose_prior_weight=0.0,
    )
    out = refine_batch(dec, images, true_ang + d_ang, true_shift + d_shift, _ctf(2), c, cfg)
    a_err = (out["angles"] - true_ang).abs()
    # tilt 0/180-free views: rot and psi compensate only near the poles, so compare rotations too
    r_out = euler_to_matrix(out["angles"][:, 0], out["angles"][:, 1], out["angles"][:, 2])
    angle = torch.rad2deg(torch.arccos(((r_out.transpose(1, 2) @ rot).diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2))
    assert float(angle.max()) < 0.3, (angle, a_err)
    assert float((out["shifts"] - true_shift).abs().max()) < 0.1


def test_particle_that_cannot_improve_keeps_its_prior_and_is_flagged() -> None:
    dec = _phantom_decoder()
    k3 = 3 * zk.count_terms(2, 1)
    rng = np.random.default_rng(2)
    angles = torch.tensor([[10.0, 50.0, 0.0], [80.0, 90.0, 30.0]], dtype=torch.float64)
    rot = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    shifts = torch.zeros(2, 2, dtype=torch.float64)
    true = torch.tensor(rng.normal(scale=0.5, size=(2, k3)))
    images = dec(true, rot, shifts, _ctf(2))
    prior = true.clone()
    prior[1] += torch.tensor(rng.normal(scale=0.8, size=k3))  # particle 1 can improve, particle 0 cannot
    cfg = RefineConfig(mode="free", prior="field", prior_weight=0.0, steps=50, learning_rate=0.02)
    out = refine_batch(dec, images, angles, shifts, _ctf(2), prior, cfg)
    assert bool(out["flagged"][0]) and not bool(out["flagged"][1])
    torch.testing.assert_close(out["coefficients"][0], prior[0], rtol=0, atol=0)
    assert float(out["cost"][0]) == float(out["cost_prior"][0])


def _landscape_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` noise-free particles whose true fields lie on one line plus an off-line part."""
    rng = np.random.default_rng(seed)
    k3 = 3 * zk.count_terms(2, 1)
    direction = rng.normal(size=k3)
    direction *= 1.5 / np.linalg.norm(direction)
    angles = torch.tensor(
        np.column_stack([rng.uniform(-180, 180, n), rng.uniform(20, 160, n), rng.uniform(-180, 180, n)])
    )
    return {
        "direction": torch.tensor(direction),
        "t": torch.tensor(rng.uniform(-1, 1, n)),
        "angles": angles,
        "off": torch.tensor(rng.normal(scale=0.6, size=(n, k3))),
    }


def test_landscape_refinement_never_ends_worse_than_an_exact_prediction() -> None:
    """When the prediction is the truth, no particle may come back with a worse image term than
    the prediction's (the baseline is the prediction itself, not its landscape projection), and
    every particle that did not beat it keeps it exactly and is flagged."""
    dec = _phantom_decoder()
    data = _landscape_batch(40, 11)
    n = len(data["t"])
    true = data["t"][:, None] * data["direction"][None] + 0.3 * data["off"]  # off the landscape too
    rot = euler_to_matrix(data["angles"][:, 0], data["angles"][:, 1], data["angles"][:, 2])
    shifts = torch.zeros(n, 2, dtype=torch.float64)
    images = dec(true, rot, shifts, _ctf(n))
    landscape = landscape_from_predictions(true.numpy(), variance=0.5, max_dimensions=1)
    cfg = RefineConfig(steps=20, grid_points=9)
    out = refine_batch(dec, images, data["angles"], shifts, _ctf(n), true, cfg, landscape=landscape)
    exact = (1 - torch.nn.functional.cosine_similarity(images.flatten(1), images.flatten(1))).abs()
    assert float(out["cost_prior"].max()) < 1e-6 + float(exact.max())  # the baseline is the exact prediction
    assert torch.all(out["cost"] <= out["cost_prior"])
    flagged = out["flagged"]
    torch.testing.assert_close(out["coefficients"][flagged], true[flagged], rtol=0, atol=0)


def test_free_stage_leaves_the_landscape_when_the_image_says_so() -> None:
    """Predictions that know only the main direction of a motion, images of fields that also have
    a part outside it: the landscape alone cannot reach that part, ``free_steps`` can."""
    dec = _phantom_decoder()
    data = _landscape_batch(24, 12)
    n = len(data["t"])
    on_line = data["t"][:, None] * data["direction"][None]
    true = on_line + data["off"]
    rot = euler_to_matrix(data["angles"][:, 0], data["angles"][:, 1], data["angles"][:, 2])
    shifts = torch.zeros(n, 2, dtype=torch.float64)
    images = dec(true, rot, shifts, _ctf(n))
    prediction = on_line + 0.05 * torch.randn(
        n, on_line.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    landscape = landscape_from_predictions(prediction.numpy(), variance=0.9, max_dimensions=1)

    def error(c: torch.Tensor) -> float:
        return float((_inplane_field(dec, c, rot) - _inplane_field(dec, true, rot)).pow(2).sum(-1).mean().sqrt())

    base = RefineConfig(steps=30, grid_points=9, patience=20)
    inside = refine_batch(dec, images, data["angles"], shifts, _ctf(n), prediction, base, landscape=landscape)
    leave = RefineConfig(
        steps=30,
        grid_points=9,
        patience=20,
        free_steps=200,
        learning_rate=0.02,
        free_prior_weight=0.0,
        free_smooth_weight=0.0,
    )
    outside = refine_batch(dec, images, data["angles"], shifts, _ctf(n), prediction, leave, landscape=landscape)
    assert error(outside["coefficients"]) < 0.6 * error(inside["coefficients"]), (
        error(prediction),
        error(inside["coefficients"]),
        error(outside["coefficients"]),
    )
    assert torch.all(outside["cost"] <= inside["cost"] + 1e-9)


def test_chunk_rows_cover_everything_once() -> None:
    rows = [chunk_rows(103, k, 4) for k in range(4)]
    np.testing.assert_array_equal(np.concatenate(rows), np.arange(103))
    with pytest.raises(ValueError):
        chunk_rows(10, 4, 4)


def test_landscape_directions() -> None:
    rng = np.random.default_rng(3)
    v = rng.normal(size=39)
    c = np.outer(rng.uniform(-1, 1, 500), v) + 0.01 * rng.normal(size=(500, 39)) + 2.0
    land = landscape_from_predictions(c, variance=0.95)
    assert land.directions.shape == (1, 39)
    assert abs(land.directions[0] @ v) / np.linalg.norm(v) > 0.999
    np.testing.assert_allclose(land.mean, c.mean(0))


def test_landscape_keeps_a_minor_second_direction_when_asked() -> None:
    """A motion that turns: one direction carries 97 % of the variance, a second the rest. The
    variance rule alone keeps one; ``min_dimensions=2`` keeps the second too (orthogonal to the
    first, within the span of the two motions); ``max_dimensions`` still caps the count."""
    rng = np.random.default_rng(5)
    u, v = rng.normal(size=39), rng.normal(size=39)
    v -= (v @ u) / (u @ u) * u
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
    c = np.outer(rng.uniform(-3, 3, 800), u) + np.outer(rng.uniform(-0.5, 0.5, 800), v)
    c += 1e-3 * rng.normal(size=c.shape)
    assert len(landscape_from_predictions(c, variance=0.95).directions) == 1
    land = landscape_from_predictions(c, variance=0.95, min_dimensions=2)
    assert land.directions.shape == (2, 39)
    assert abs(land.directions[0] @ u) > 0.999 and abs(land.directions[1] @ v) > 0.999
    assert len(landscape_from_predictions(c, variance=0.95, min_dimensions=4, max_dimensions=3).directions) == 3


def test_landscape_and_precision_from_rows_read_off_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two motions plus noise, 3,000 predictions read from a .npy a block at a time: the landscape
    (from the scatter matrix) matches numpy's SVD of the whole centred array (directions up to the
    fixed sign, score scale, range) and the precision matches the inverse of np.cov."""
    import z3lib.io.coefficients as coefficients_io
    from z3lib.io import CoefficientFile, FieldRows
    from z3lib.refine import population_precision

    monkeypatch.setattr(coefficients_io, "ROW_BLOCK", 256)
    rng = np.random.default_rng(21)
    u, v = rng.normal(size=39), rng.normal(size=39)
    c = np.outer(rng.uniform(-2, 2, 3000), u) + np.outer(rng.normal(0, 0.5, 3000), v)
    c += 0.01 * rng.normal(size=c.shape) + 1.5
    np.save(tmp_path / "c.npy", c)
    land = landscape_from_predictions(FieldRows(CoefficientFile(tmp_path / "c.npy")), variance=0.999)
    _, sv, vt = np.linalg.svd(c - c.mean(0), full_matrices=False)
    assert land.directions.shape == (2, 39)
    signs = np.sign(np.sum(land.directions * vt[:2], axis=1))
    np.testing.assert_allclose(land.directions, vt[:2] * signs[:, None], atol=1e-8)
    for d in land.directions:
        assert d[np.abs(d).argmax()] > 0
    scores = (c - c.mean(0)) @ land.directions.T
    np.testing.assert_allclose(land.mean, c.mean(0), rtol=1e-12)
    np.testing.assert_allclose(land.scale, scores.std(0) + 1e-12, rtol=1e-9)
    np.testing.assert_allclose(land.low, scores.min(0), rtol=1e-9)
    np.testing.assert_allclose(land.high, scores.max(0), rtol=1e-9)
    cov = np.cov(c, rowvar=False)
    cov += 1e-3 * np.trace(cov) / 39 * np.eye(39)
    np.testing.assert_allclose(
        population_precision(FieldRows(CoefficientFile(tmp_path / "c.npy"))), np.linalg.inv(cov), rtol=1e-6
    )


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refine")
    sim = simulate_dataset(
        root / "sim",
        start_model=ADK / "adk_closed.pdb",
        end_model=ADK / "adk_open.pdb",
        n_particles=60,
        box=32,
        pixel_size=4.0,
        resolution=10.0,
        snr=1.0,
        seed=4,
    )
    pre = preprocess(sim["particles"], sim["reference"], sim["mask"], root / "pre", box=24)
    rng = np.random.default_rng(5)
    coeffs = np.outer(rng.uniform(-1, 1, 60), rng.normal(size=39)) + 0.05 * rng.normal(size=(60, 39))
    write_coefficients(root / "prior.npy", coeffs)
    return {
        "sim_particles": sim["particles"],
        "particles": pre["particles"],
        "points": pre["points"],
        "prior": root / "prior.npy",
        "root": root,
    }


def test_chunks_gather_in_star_order_and_match_one_chunk(small_run: dict[str, Path]) -> None:
    root = small_run["root"]
    cfg = RefineConfig(steps=5, grid_points=5, batch_size=16)
    kw = {"zernike": {"L1": 3, "L2": 2, "basis": "xmipp"}, "config": cfg}
    whole = refine_chunk(
        small_run["particles"], small_run["points"], small_run["prior"], root / "whole.npz", chunk=0, n_chunks=1, **kw
    )  # type: ignore[arg-type]
    parts = [
        refine_chunk(
            small_run["particles"],
            small_run["points"],
            small_run["prior"],
            root / f"c{k}.npz",
            chunk=k,
            n_chunks=3,
            **kw,
        )
        for k in (2, 0, 1)
    ]  # type: ignore[arg-type]
    out = gather_refined(parts, small_run["sim_particles"], root / "gathered", zernike=ZERNIKE_32)
    one = gather_refined([whole], small_run["sim_particles"], root / "one", zernike=ZERNIKE_32)
    star = read_star_blocks(out["particles"])["particles"]
    original = read_star_blocks(small_run["sim_particles"])["particles"]
    assert star["rlnImageName"].tolist() == original["rlnImageName"].tolist()
    np.testing.assert_allclose(
        read_coefficients(out["coefficients"]), read_coefficients(one["coefficients"]), atol=1e-5
    )
    assert {"zernikeCoefficients", "zernikeCost", "zernikeCostPrior", "zernikeRefineFlag"} <= set(star.columns)
    assert float(read_star_blocks(out["particles"])["zernike3d"].iloc[0]["Rmax"]) == 16.0
    # refined costs never exceed the starting costs; flagged rows keep the prior exactly
    assert np.all(star["zernikeCost"] <= star["zernikeCostPrior"] + 1e-9)
    flagged = star["zernikeRefineFlag"].to_numpy() == 1
    prior = read_coefficients(small_run["prior"])
    np.testing.assert_allclose(read_coefficients(out["coefficients"])[flagged], prior[flagged], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="missing or repeated"):
        gather_refined(parts[:2], small_run["sim_particles"], root / "bad", zernike=ZERNIKE_32)


def test_refinement_starts_from_and_writes_the_predict_stages_poses(small_run: dict[str, Path]) -> None:
    """Issue 12, item 3. With ``train.refine_pose`` the predict stage's STAR holds the network's
    corrected angles and shifts (the particles as given, original box); refine_chunk given it as
    ``poses`` starts from them, and the refine stage's STAR carries them (angles and shifts not
    refined here, so they come back exactly; shifts back in px of the original box). In round
    k >= 2 the predict STAR also carries round k-1's refined defocus: the refine STAR keeps it
    (the defocus offsets refer to the starting CTF, not to the particles as given)."""
    from z3lib.io import read_particles, write_particles_star

    root = small_run["root"]
    original = read_particles(small_run["sim_particles"])
    rng = np.random.default_rng(8)
    table = original.table.copy()
    for name in ("rot", "tilt", "psi"):
        table[name] = table[name] + rng.normal(scale=4.0, size=len(table))
    for name in ("shift_x", "shift_y"):
        table[name] = table[name] + rng.normal(scale=1.5, size=len(table))
    defocus_change = rng.normal(scale=300.0, size=len(table))
    for name in ("defocus_u", "defocus_v"):
        table[name] = table[name] + defocus_change
    predicted = root / "predict_poses.star"  # metadata only: its images are never read
    write_particles_star(predicted, original, table=table)
    cfg = RefineConfig(steps=2, grid_points=3, batch_size=32)
    chunk = refine_chunk(
        small_run["particles"],
        small_run["points"],
        small_run["prior"],
        root / "posed.npz",
        chunk=0,
        n_chunks=1,
        zernike=ZERNIKE_32,
        config=cfg,
        poses=predicted,
    )
    out = gather_refined([chunk], small_run["sim_particles"], root / "posed", zernike=ZERNIKE_32)
    refined = read_particles(out["particles"]).table
    for name in ("rot", "tilt", "psi", "shift_x", "shift_y", "defocus_u", "defocus_v"):
        np.testing.assert_allclose(refined[name], table[name], rtol=0, atol=1e-3, err_msg=name)
    assert np.abs(refined["rot"] - original.table["rot"]).max() > 1.0  # not the preprocess STAR's poses
