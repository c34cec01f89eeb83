"""Zernike3D basis against the documented closed forms, quadrature and known fields."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch

from z3lib import zernike as zk
from z3lib.geometry import points_from_mask, sphere_mask

DATA = Path(__file__).parent / "data"
PI = math.pi
S = math.sqrt

# Closed-form radials for l1 <= 5 (docs/algorithms.md §1.2), keyed by (l1, l2).
RADIALS = {
    (0, 0): lambda r: S(3) + 0 * r,
    (1, 1): lambda r: S(5) * r,
    (2, 0): lambda r: S(7) * (5 * r**2 / 2 - 3 / 2),
    (2, 2): lambda r: S(7) * r**2,
    (3, 1): lambda r: 21 / 2 * r**3 - 15 / 2 * r,
    (3, 3): lambda r: 3 * r**3,
    (4, 0): lambda r: S(11) * (63 * r**4 / 8 - 35 * r**2 / 4 + 15 / 8),
    (4, 2): lambda r: S(11) * r**2 * (9 * r**2 / 2 - 7 / 2),
    (4, 4): lambda r: S(11) * r**4,
    (5, 1): lambda r: S(13) * r * (99 * r**4 / 8 - 63 * r**2 / 4 + 35 / 8),
    (5, 3): lambda r: S(13) * r**3 * (11 * r**2 / 2 - 9 / 2),
    (5, 5): lambda r: S(13) * r**5,
}

# Angular table for l2 <= 3 at scaled coordinates (§3.3), m = -l2..l2.
ANGULAR = {
    0: [lambda x, y, z: 1 / (2 * S(PI)) + 0 * x],
    1: [lambda x, y, z: S(3 / (4 * PI)) * y, lambda x, y, z: S(3 / (4 * PI)) * z, lambda x, y, z: S(3 / (4 * PI)) * x],
    2: [
        lambda x, y, z: S(15 / (4 * PI)) * x * y,
        lambda x, y, z: S(15 / (4 * PI)) * y * z,
        lambda x, y, z: S(5 / (16 * PI)) * (2 * z**2 - x**2 - y**2),
        lambda x, y, z: S(15 / (4 * PI)) * x * z,
        lambda x, y, z: S(15 / (16 * PI)) * (x**2 - y**2),
    ],
    3: [
        lambda x, y, z: S(35 / (32 * PI)) * y * (3 * x**2 - y**2),
        lambda x, y, z: S(105 / (4 * PI)) * x * y * z,
        lambda x, y, z: S(21 / (32 * PI)) * y * (4 * z**2 - x**2 - y**2),
        lambda x, y, z: S(7 / (16 * PI)) * z * (2 * z**2 - 3 * x**2 - 3 * y**2),
        lambda x, y, z: S(21 / (32 * PI)) * x * (4 * z**2 - x**2 - y**2),
        lambda x, y, z: S(105 / (16 * PI)) * z * (x**2 - y**2),
        lambda x, y, z: S(35 / (32 * PI)) * x * (x**2 - 3 * y**2),
    ],
}


def _ball_quadrature(nr: int, nt: int, nph: int) -> tuple[np.ndarray, np.ndarray]:
    """Product Gauss rule on the unit ball: Gauss–Legendre in r and cos θ, trapezoid in φ."""
    x, w = np.polynomial.legendre.leggauss(nr)
    r, wr = 0.5 * (x + 1), 0.5 * w
    ct, wt = np.polynomial.legendre.leggauss(nt)
    ph = np.arange(nph) * 2 * PI / nph
    R, CT, PH = np.meshgrid(r, ct, ph, indexing="ij")
    W = (wr[:, None, None] * r[:, None, None] ** 2) * wt[None, :, None] * (2 * PI / nph)
    st = np.sqrt(1 - CT**2)
    pts = np.stack([R * st * np.cos(PH), R * st * np.sin(PH), R * CT], -1).reshape(-1, 3)
    return pts, np.broadcast_to(W, R.shape).reshape(-1)


def _ball_points(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.uniform(-1, 1, size=(3 * n, 3))
    return p[(p**2).sum(1) <= 1][:n]


@pytest.mark.parametrize(
    "degrees,k",
    [
        ((1, 1), 4),
        ((2, 2), 10),
        ((3, 2), 13),
        ((3, 3), 20),
        ((4, 4), 35),
        ((5, 5), 56),
        ((6, 6), 84),
        ((7, 7), 120),
        ((8, 8), 165),
    ],
)
def test_term_counts(degrees: tuple[int, int], k: int) -> None:
    assert zk.count_terms(*degrees) == k
    assert zk.basis_indices(*degrees).shape == (k, 4)


def test_index_order_documented_example() -> None:
    expected = [
        (0, 0, 0, 0),
        (2, 0, 0, 0),
        (1, 1, 1, -1),
        (1, 1, 1, 0),
        (1, 1, 1, 1),
        (3, 1, 1, -1),
        (3, 1, 1, 0),
        (3, 1, 1, 1),
    ] + [(2, 2, 2, m) for m in range(-2, 3)]
    assert [tuple(r) for r in zk.basis_indices(3, 2).tolist()] == expected


def test_degree_errors() -> None:
    with pytest.raises(ValueError, match="L1 >= L2"):
        zk.count_terms(2, 3)
    with pytest.raises(ValueError, match="orthonormal"):
        zk.evaluate_basis(np.zeros((1, 3)), 5, 5, 1.0, basis="xmipp")
    with pytest.raises(ValueError, match="unknown Zernike3D basis"):
        zk.evaluate_basis(np.zeros((1, 3)), 3, 2, 1.0, basis="zernike")


@pytest.mark.parametrize("key", sorted(RADIALS))
def test_radial_closed_forms(key: tuple[int, int]) -> None:
    r = np.linspace(0, 1, 17)
    poly = zk.radial_coefficients(*key)
    values = r ** key[1] * np.polyval(poly[::-1], r**2)
    np.testing.assert_allclose(values, RADIALS[key](r), atol=1e-12)


@pytest.mark.parametrize("l1,l2", [(l1, l2) for l1 in range(12) for l2 in range(l1 % 2, l1 + 1, 2)])
def test_radial_normalisation_by_quadrature(l1: int, l2: int) -> None:
    x, w = np.polynomial.legendre.leggauss(30)
    r, w = 0.5 * (x + 1), 0.5 * w
    values = r**l2 * np.polyval(zk.radial_coefficients(l1, l2)[::-1], r**2)
    assert np.sum(w * values**2 * r**2) == pytest.approx(1.0, abs=1e-10)


def test_xmipp_basis_equals_documented_closed_forms() -> None:
    """Z_k = R_{l1}^{l2}(r) · A_{l2}^m(x̃) for l1 <= 5, l2 <= 3 (inside the unit ball)."""
    rmax = 20.0
    pts = _ball_points(400) * rmax
    values = zk.evaluate_basis(pts, 5, 3, rmax, basis="xmipp")
    x, y, z = (pts / rmax).T
    r = np.sqrt(x**2 + y**2 + z**2)
    for col, (l1, _, l2, m) in enumerate(zk.basis_indices(5, 3)):
        expected = RADIALS[(int(l1), int(l2))](r) * ANGULAR[int(l2)][int(m) + int(l2)](x, y, z)
        np.testing.assert_allclose(values[:, col], expected, atol=1e-10, err_msg=f"term {(l1, l2, m)}")


def test_xmipp_l2_4_quirks_and_rounded_tables() -> None:
    pts = _ball_points(300)
    x, y, z = pts.T
    r = np.sqrt((pts**2).sum(1))
    idx = [tuple(t) for t in zk.basis_indices(6, 4).tolist()]
    values = zk.evaluate_basis(pts, 6, 4, 1.0, basis="xmipp")
    # l2 = 4, m = 0 uses 35z^4 - 30z^2 + 3 (rho^2 replaced by 1)
    col = idx.index((4, 4, 4, 0))
    expected = S(11) * r**4 * S(9 / (256 * PI)) * (35 * z**4 - 30 * z**2 + 3)
    np.testing.assert_allclose(values[:, col], expected, atol=1e-10)
    col = idx.index((4, 4, 4, -4))
    np.testing.assert_allclose(values[:, col], S(11) * r**4 * S(315 / (16 * PI)) * x * y * (x**2 - y**2), atol=1e-10)
    # l1 = 6 uses the hand-rounded table: R_6^0 = 103.8 r^6 - 167.7 r^4 + 76.25 r^2 - 8.472
    col = idx.index((6, 0, 0, 0))
    expected = (103.8 * r**6 - 167.7 * r**4 + 76.25 * r**2 - 8.472) / (2 * S(PI))
    np.testing.assert_allclose(values[:, col], expected, atol=1e-10)


def test_xmipp_gram_matches_documented_non_orthonormality() -> None:
    """(3,2) Gram over the unit ball: diagonal 0.56–1.00, off-diagonal up to 0.22 (§3.5)."""
    pts, w = _ball_quadrature(12, 12, 24)
    z = zk.evaluate_basis(pts, 3, 2, 1.0, basis="xmipp")
    g = (z * w[:, None]).T @ z
    d = np.diag(g)
    assert d.min() == pytest.approx(0.56, abs=0.01) and d.max() == pytest.approx(1.0, abs=0.01)
    off = np.abs(g - np.diag(d)).max()
    assert off == pytest.approx(0.22, abs=0.01)


@pytest.mark.parametrize("degrees", [(3, 2), (5, 5), (7, 7)])
def test_orthonormal_basis_by_quadrature(degrees: tuple[int, int]) -> None:
    """∫_ball Z_a Z_b dV = δ_ab with a product Gauss rule exact for these degrees."""
    pts, w = _ball_quadrature(16, 16, 32)
    z = zk.evaluate_basis(pts, *degrees, 1.0, basis="orthonormal")
    g = (z * w[:, None]).T @ z
    np.testing.assert_allclose(g, np.eye(len(g)), atol=1e-9)


def test_basis_zero_outside_ball_and_numpy_torch_agree(device: str) -> None:
    pts = np.array([[30.0, 0, 0], [0, 0, 33.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    v = zk.evaluate_basis(pts, 3, 2, 32.0)
    assert np.all(v[1] == 0) and np.any(v[0] != 0)
    # at r = 0 only l2 = 0 terms survive
    assert np.all(v[3][zk.basis_indices(3, 2)[:, 2] > 0] == 0)
    for dtype in (torch.float32, torch.float64):
        t = zk.evaluate_basis(torch.tensor(pts, dtype=dtype, device=device), 3, 2, 32.0)
        assert t.dtype == dtype and t.device.type == device
        np.testing.assert_allclose(t.cpu().numpy(), v, rtol=1e-5, atol=1e-6)
    assert zk.evaluate_basis(pts.astype(np.float32), 3, 2, 32.0).dtype == np.float32


@pytest.mark.parametrize("basis,degrees", [("xmipp", (3, 2)), ("xmipp", (5, 4)), ("orthonormal", (7, 7))])
def test_fit_recovers_known_coefficients(basis: str, degrees: tuple[int, int]) -> None:
    box = 48
    pts, _ = points_from_mask(sphere_mask(box, radius=box / 2 - 1))
    k = zk.count_terms(*degrees)
    rng = np.random.default_rng(3)
    true = rng.normal(scale=0.5, size=3 * k)
    z = zk.evaluate_basis(pts, *degrees, box / 2, basis)
    disp = zk.deformation_field(z, true)
    assert disp.shape == (len(pts), 3)
    fitted = zk.fit_coefficients(pts, disp, *degrees, box / 2, basis)
    np.testing.assert_allclose(fitted, true, atol=1e-8)


def test_field_fitted_at_64_rescaled_matches_at_128() -> None:
    """A physical field (Å) sampled at box 64 and 128 (half the pixel size): fit at 64, rescale,
    and the field evaluated on the 128 grid equals the 128 samples."""
    apix64 = 2.0
    rng = np.random.default_rng(4)
    true_64 = rng.normal(scale=0.8, size=39)  # px of box 64, Rmax 32

    def field_angstrom(points_angstrom: np.ndarray) -> np.ndarray:
        z = zk.evaluate_basis(points_angstrom / apix64, 3, 2, 32.0)
        return zk.deformation_field(z, true_64) * apix64

    p64, _ = points_from_mask(sphere_mask(64, radius=30))
    fitted = zk.fit_coefficients(p64, field_angstrom(p64 * apix64) / apix64, 3, 2, 32.0)
    c128 = zk.rescale_coefficients(fitted, 64, 128)
    p128, _ = points_from_mask(sphere_mask(128, radius=60), step=3)
    d128 = zk.deformation_field(zk.evaluate_basis(p128, 3, 2, 64.0), c128)
    expected = field_angstrom(p128 * apix64 / 2) / (apix64 / 2)
    np.testing.assert_allclose(d128, expected, atol=1e-8)


def test_convert_degrees_keeps_each_axis_block() -> None:
    k32, k22 = zk.count_terms(3, 2), zk.count_terms(2, 2)
    c = np.concatenate([np.arange(k32) + 100.0, np.arange(k32) + 200.0, np.arange(k32) + 300.0])
    small = zk.convert_degrees(c, (3, 2), (2, 2))
    assert small.shape == (3 * k22,)
    src = [tuple(t) for t in zk.basis_indices(3, 2)[:, [0, 2, 3]].tolist()]
    for j, key in enumerate(zk.basis_indices(2, 2)[:, [0, 2, 3]].tolist()):
        i = src.index(tuple(key))
        assert small[j] == 100 + i and small[k22 + j] == 200 + i and small[2 * k22 + j] == 300 + i
    back = zk.convert_degrees(small, (2, 2), (3, 2))
    dropped = [i for i, key in enumerate(src) if key[0] == 3]
    assert np.all(back[dropped] == 0) and np.all(back[[i + 2 * k32 for i in dropped]] == 0)


def test_deformation_field_torch_batch_gradient() -> None:
    pts = torch.tensor(_ball_points(50) * 10, dtype=torch.float64)
    z = zk.evaluate_basis(pts, 3, 2, 10.0)
    c = torch.zeros(4, 39, dtype=torch.float64, requires_grad=True)
    d = zk.deformation_field(z, c)
    assert d.shape == (4, 50, 3)
    d[..., 0].sum().backward()
    np.testing.assert_allclose(c.grad[0, :13].numpy(), z.sum(0).numpy())
    assert torch.all(c.grad[:, 13:] == 0)


def test_refit_basis_is_the_least_squares_fit_of_each_field() -> None:
    """Converting fields between bases (e.g. orthonormal → Xmipp for the .xmd export) gives, for
    every particle, the least-squares fit of its field in the target basis, and the reported
    residual is that fit's relative error; within one basis nothing changes."""
    rng = np.random.default_rng(3)
    pts, _ = points_from_mask(sphere_mask(24, 10))
    pts = pts.astype(np.float64)
    c = rng.normal(size=(4, 3 * zk.count_terms(5, 5)))
    out, residual = zk.refit_basis(c, pts, zk.ZernikeSpec(5, 5, "orthonormal", 24), zk.ZernikeSpec(5, 4, "xmipp", 24))
    z_from = zk.evaluate_basis(pts, 5, 5, 12.0, "orthonormal")
    z_to = zk.evaluate_basis(pts, 5, 4, 12.0, "xmipp")
    errors, norms = 0.0, 0.0
    for i in range(4):
        field = zk.deformation_field(z_from, c[i])
        expected = zk.fit_coefficients(pts, field, 5, 4, 12.0, "xmipp")
        np.testing.assert_allclose(out[i], expected, rtol=1e-6, atol=1e-8)
        errors += float(((zk.deformation_field(z_to, expected) - field) ** 2).sum())
        norms += float((field**2).sum())
    assert residual == pytest.approx(np.sqrt(errors / norms), rel=1e-6)
    assert 0 < residual < 1
    same, zero = zk.refit_basis(
        c[:, : 3 * zk.count_terms(3, 2)], pts, zk.ZernikeSpec(3, 2, "xmipp", 24), zk.ZernikeSpec(3, 2, "xmipp", 24)
    )
    np.testing.assert_allclose(same, c[:, : 3 * zk.count_terms(3, 2)], atol=1e-9)
    assert zero < 1e-10


# ----------------------------------------------------------------------------------------------
# ZernikeSpec: the basis as one value
# ----------------------------------------------------------------------------------------------
def test_spec_on_another_box_describes_the_same_physical_field() -> None:
    """A field in Å fitted on box 64 by its spec and converted to the spec on box 128 (half the
    pixel size) gives, on the 128 grid, the same field in Å: Rmax and the unit follow the box."""
    apix64 = 2.0
    spec64 = zk.ZernikeSpec(5, 3, "orthonormal", 64)
    rng = np.random.default_rng(8)
    true_px64 = rng.normal(scale=0.5, size=spec64.n_coefficients)
    assert spec64.rmax == 32.0 and spec64.n_coefficients == 3 * zk.count_terms(5, 3)

    def field_angstrom(points_angstrom: np.ndarray) -> np.ndarray:  # analytic: basis at Rmax 64 Å
        return zk.deformation_field(zk.evaluate_basis(points_angstrom, 5, 3, 64.0, "orthonormal"), true_px64) * apix64

    p64, _ = points_from_mask(sphere_mask(64, radius=30))
    fitted = spec64.fit(p64, field_angstrom(p64 * apix64) / apix64)
    spec128 = spec64.rescaled(128)
    assert (spec128.degrees, spec128.basis, spec128.rmax) == ((5, 3), "orthonormal", 64.0)
    c128 = spec64.convert(fitted, spec128)
    p128, _ = points_from_mask(sphere_mask(128, radius=60), step=3)
    np.testing.assert_allclose(
        zk.deformation_field(spec128.evaluate(p128), c128) * apix64 / 2, field_angstrom(p128 * apix64 / 2), atol=1e-8
    )
    with pytest.raises(ValueError, match="refit_basis"):
        spec64.convert(fitted, zk.ZernikeSpec(5, 3, "xmipp", 128))


def test_spec_block_is_what_a_star_reader_finds(tmp_path: Path) -> None:
    """The ``data_zernike3d`` block written from a spec, read back by ``starfile`` (not ours),
    holds Rmax = box / 2 and gives the same spec; blocks we cannot honour are refused by name."""
    from z3lib.io import read_particles, write_particles_star

    spec = zk.ZernikeSpec(7, 7, "orthonormal", 180)
    parts = read_particles(DATA / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs")
    out = tmp_path / "p.star"
    write_particles_star(out, parts, zernike=spec)
    block = starfile.read(out, always_dict=True)["zernike3d"]
    values = dict(block) if isinstance(block, dict) else block.iloc[0].to_dict()
    assert float(values["Rmax"]) == 90.0 and int(values["box"]) == 180 and values["basis"] == "orthonormal"
    assert zk.ZernikeSpec.from_block(values) == spec
    with pytest.raises(ValueError, match="Rmax 60"):
        zk.ZernikeSpec.from_block({**values, "Rmax": 60})
    with pytest.raises(ValueError, match="missing basis"):
        zk.ZernikeSpec.from_block({k: v for k, v in values.items() if k != "basis"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((5, 5, "xmipp", 64), "L2 <= 4"),
        ((2, 3, "orthonormal", 64), "L1 >= L2"),
        ((3, 2, "legendre", 64), "unknown Zernike3D basis"),
        ((3, 2, "xmipp", 1), "box must be at least 2"),
        ((3.5, 2, "xmipp", 64), "L1 must be an integer"),
    ],
)
def test_spec_refuses_a_basis_that_does_not_exist(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        zk.ZernikeSpec(*args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing L2"):
        zk.ZernikeSpec.from_config({"L1": 3, "basis": "xmipp"}, 64)
