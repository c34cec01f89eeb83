"""Deformed point-cloud projection: placement, adjoint, bounds, gradients, rigid case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from z3lib import zernike as zk
from z3lib.geometry import euler_to_matrix, points_from_mask, random_rotations, sphere_mask
from z3lib.projection import (
    backproject_points,
    bin_amplitudes,
    bin_points,
    gather_bilinear,
    image_positions,
    project_points,
    project_volume,
    rotations_from_euler,
    splat_bilinear,
)


def _t(a: np.ndarray, device: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)


def test_splat_gather_adjoint(device: str) -> None:
    """<splat(a), I> = <a, gather(I)> for random positions, some of them outside the image."""
    rng = np.random.default_rng(0)
    box = 20
    pos = _t(rng.uniform(-3, box + 2, size=(3, 500, 2)), device)
    a = _t(rng.normal(size=(3, 500)), device)
    img = _t(rng.normal(size=(3, box, box)), device)
    lhs = (splat_bilinear(pos, a, box) * img).sum()
    rhs = (a * gather_bilinear(img, pos)).sum()
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-12)


def test_project_backproject_adjoint_with_deformation(device: str) -> None:
    rng = np.random.default_rng(1)
    box = 24
    pts = _t(points_from_mask(sphere_mask(box, 10), step=2)[0], device)
    basis = zk.evaluate_basis(pts, 3, 2, box / 2)
    coeffs = _t(rng.normal(scale=1.0, size=(4, 39)), device)
    rots = _t(random_rotations(4, rng), device)
    shifts = _t(rng.normal(size=(4, 2)), device)
    amps = _t(rng.normal(size=(4, len(pts))), device)
    imgs = _t(rng.normal(size=(4, box, box)), device)
    fwd = project_points(pts, amps, rots, shifts, box, basis=basis, coefficients=coeffs)
    bwd = backproject_points(imgs, pts, rots, shifts, basis=basis, coefficients=coeffs)
    assert float((fwd * imgs).sum()) == pytest.approx(float((amps * bwd).sum()), rel=1e-12)


def test_point_placement_centre_shift_sign_and_axes(device: str) -> None:
    box = 16
    c = box // 2
    pts = _t([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, -2.0, 5.0]], device)
    eye = torch.eye(3, dtype=torch.float64, device=device)[None]
    img = project_points(pts, _t([1.0, 2.0, 4.0], device), eye, None, box)[0].cpu().numpy()
    assert img[c, c] == 1.0  # centre of the box is N // 2, images are [row = y, column = x]
    assert img[c, c + 3] == 2.0
    assert img[c - 2, c] == 4.0  # z is the projection axis
    # u = (A p)_xy - s: a positive shift moves the particle towards lower indices
    img = project_points(pts[:1], _t([1.0], device), eye, _t([[2.0, -3.0]], device), box)[0].cpu().numpy()
    assert img[c + 3, c - 2] == 1.0
    # tilt 90: the reference x axis becomes the viewing axis, z goes to -x
    a = _t(euler_to_matrix(0.0, 90.0, 0.0)[None], device)
    img = project_points(pts, _t([1.0, 2.0, 4.0], device), a, None, box)[0].cpu().numpy()
    assert img[c, c] == 3.0 and img[c - 2, c - 5] == 4.0


def test_centred_delta_stays_centred_under_rotations(device: str) -> None:
    rng = np.random.default_rng(2)
    rots = _t(random_rotations(50, rng), device)
    img = project_points(_t([[0.0, 0, 0]], device), _t([1.0], device), rots, None, 9).cpu().numpy()
    assert np.all(img[:, 4, 4] == pytest.approx(1.0)) and np.allclose(img.sum((1, 2)), 1.0)


def test_points_outside_are_dropped_not_crashing(device: str) -> None:
    box = 8
    pts = _t([[100.0, 0, 0], [-4.5, 0.0, 0.0], [0.0, 3.5, 0.0], [1e6, -1e6, 0.0]], device)
    eye = torch.eye(3, dtype=torch.float64, device=device)[None]
    img = project_points(pts, _t([1.0, 1.0, 1.0, 1.0], device), eye, None, box)
    # (-4.5) sits half outside on the left; (3.5) half inside at the bottom edge; others gone
    assert float(img.sum()) == pytest.approx(1.0)


def test_push_deformation_moves_points_by_the_field(device: str) -> None:
    """A constant (l1 = 0) x-coefficient translates every point by c · Z_000 = c · √3 / (2√π)."""
    box = 32
    pts = _t([[0.0, 0.0, 0.0], [2.0, 3.0, -1.0]], device)
    basis = zk.evaluate_basis(pts, 3, 2, box / 2)
    coeffs = torch.zeros(1, 39, dtype=torch.float64, device=device)
    coeffs[0, 0] = 2.0 / (np.sqrt(3) / (2 * np.sqrt(np.pi)))  # +2 px along x
    eye = torch.eye(3, dtype=torch.float64, device=device)[None]
    pos = image_positions(pts, eye, None, box, basis=basis, coefficients=coeffs)[0].cpu().numpy()
    np.testing.assert_allclose(pos, [[18.0, 16.0], [20.0, 19.0]], atol=1e-12)


def test_zero_coefficients_equal_rigid_projection(device: str) -> None:
    rng = np.random.default_rng(3)
    box = 20
    pts, _ = points_from_mask(sphere_mask(box, 8))
    pts_t = _t(pts, device, torch.float32)
    basis = zk.evaluate_basis(pts_t, 5, 5, box / 2, basis="orthonormal")
    rots = _t(random_rotations(3, rng), device, torch.float32)
    amps = _t(rng.uniform(size=len(pts)), device, torch.float32)
    rigid = project_points(pts_t, amps, rots, None, box)
    zero = project_points(
        pts_t, amps, rots, None, box, basis=basis, coefficients=torch.zeros(3, 3 * basis.shape[1], device=device)
    )
    torch.testing.assert_close(rigid, zero)


def test_gradients_match_finite_differences() -> None:
    """Autograd through push, Euler angles, shifts and amplitudes (float64 gradcheck)."""
    rng = np.random.default_rng(4)
    box = 16
    pts = torch.tensor(rng.uniform(-5, 5, size=(30, 3)))
    basis = zk.evaluate_basis(pts, 3, 2, box / 2)
    coeffs = torch.tensor(rng.normal(scale=0.3, size=(2, 39)), requires_grad=True)
    angles = torch.tensor(rng.uniform(10, 170, size=(3, 2)), requires_grad=True)
    shifts = torch.tensor(rng.normal(scale=0.5, size=(2, 2)), requires_grad=True)
    amps = torch.tensor(rng.uniform(0.5, 1.5, size=30), requires_grad=True)
    weights = torch.tensor(rng.normal(size=(2, box, box)))

    def f(c: torch.Tensor, ang: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        rots = rotations_from_euler(ang[0], ang[1], ang[2], dtype=torch.float64)
        return (project_points(pts, a, rots, s, box, basis=basis, coefficients=c) * weights).sum()

    assert torch.autograd.gradcheck(f, (coeffs, angles, shifts, amps), eps=1e-6, atol=1e-5)


def test_splat_gradients_match_finite_differences_at_the_border() -> None:
    """The splat's hand-written gradient (positions, per-image amplitudes), with points inside,
    straddling the border and outside the image (float64 gradcheck)."""
    rng = np.random.default_rng(7)
    box = 10
    pos = torch.tensor(rng.uniform(-2.6, box + 1.6, size=(2, 60, 2)), requires_grad=True)
    amps = torch.tensor(rng.uniform(0.5, 1.5, size=(2, 60)), requires_grad=True)
    weights = torch.tensor(rng.normal(size=(2, box, box)))
    outside = ((pos < -1) | (pos >= box)).any(-1)
    assert outside.any() and (~outside).any()

    def f(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return (splat_bilinear(p, a, box) * weights).sum()

    assert torch.autograd.gradcheck(f, (pos, amps), eps=1e-6, atol=1e-6)


def test_rigid_projection_matches_line_integral() -> None:
    """Splat projection of a smooth map ≈ the line integral through it (trilinear gather)."""
    box = 32
    rng = np.random.default_rng(5)
    coords = np.stack(np.meshgrid(*[np.arange(box) - box // 2] * 3, indexing="ij"), -1)
    vol = np.zeros((box,) * 3)
    for centre, width in ((rng.uniform(-6, 6, 3), 3.0), (rng.uniform(-6, 6, 3), 2.0), (np.zeros(3), 4.0)):
        vol += np.exp(-((coords - centre[::-1]) ** 2).sum(-1) / (2 * width**2))
    rots = random_rotations(4, rng)
    ours = project_volume(vol, torch.tensor(rots)).numpy()
    c = box // 2
    grid = np.stack(np.meshgrid(np.arange(box) - c, np.arange(box) - c, np.arange(box) - c, indexing="ij"), -1)
    for i, a in enumerate(rots):
        q = grid[..., ::-1].reshape(-1, 3).astype(float)  # (x, y, z) in the projection frame
        p = q @ a  # A^T q: back to the reference frame
        samples = map_coordinates(vol, [p[:, 2] + c, p[:, 1] + c, p[:, 0] + c], order=1)
        ref = samples.reshape(box, box, box).sum(0)  # sum over the viewing axis z
        assert np.corrcoef(ours[i].ravel(), ref.ravel())[0, 1] > 0.995
        assert ours[i].sum() == pytest.approx(vol.sum(), rel=1e-3)  # only box corners leave


def test_binned_cloud_keeps_mass_and_centroid() -> None:
    """Trilinear binning onto a coarser grid (the encoder's reference channel) keeps every
    point's amplitude and its first moment exactly: linear interpolation reproduces linear
    functions, so Σ a_coarse = Σ a and Σ a_coarse · x_coarse = scale · Σ a x."""
    rng = np.random.default_rng(3)
    points = torch.tensor(rng.uniform(-20, 20, size=(500, 3)))
    amps = torch.tensor(rng.uniform(0.1, 2.0, size=500))
    scale = 0.3
    coarse, source, target, weight = bin_points(points, scale)
    binned = bin_amplitudes(amps, source, target, weight, len(coarse))
    assert torch.equal(coarse, torch.round(coarse))  # on the coarse integer grid
    assert float(binned.sum()) == pytest.approx(float(amps.sum()), rel=1e-12)
    np.testing.assert_allclose((binned[:, None] * coarse).sum(0), scale * (amps[:, None] * points).sum(0), rtol=1e-10)
    # a dense voxel cloud binned by 2 has about an eighth as many points
    grid = torch.tensor(points_from_mask(sphere_mask(32, 12), step=1)[0])
    assert len(bin_points(grid, 0.5)[0]) < 0.2 * len(grid)
