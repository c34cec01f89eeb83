"""Euler angles, shifts, pixel sizes and wavelengths against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from z3lib import conventions as cv
from z3lib.geometry import euler_to_matrix, matrix_to_euler, random_rotations


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
    return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1.0]])


def _ry(a: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
    return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])


@given(
    st.floats(-180, 180),
    st.floats(0, 180),
    st.floats(-180, 180),
)
@settings(max_examples=200, deadline=None)
def test_euler_matrix_is_zyz_product(rot: float, tilt: float, psi: float) -> None:
    """A = R_z(psi) R_y(tilt) R_z(rot), built here from elementary rotations."""
    expected = _rz(psi) @ _ry(tilt) @ _rz(rot)
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), expected, atol=1e-12)


def test_euler_matrix_rows_match_design_table() -> None:
    rot, tilt, psi = 30.0, 50.0, -70.0
    f, t, p = np.deg2rad([rot, tilt, psi])
    cf, sf, ct, st_, cp, sp = np.cos(f), np.sin(f), np.cos(t), np.sin(t), np.cos(p), np.sin(p)
    expected = np.array(
        [
            [cp * ct * cf - sp * sf, cp * ct * sf + sp * cf, -cp * st_],
            [-sp * ct * cf - cp * sf, -sp * ct * sf + cp * cf, sp * st_],
            [st_ * cf, st_ * sf, ct],
        ]
    )
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), expected, atol=1e-14)


def test_projection_direction_is_rotated_z() -> None:
    """Tilt 90 with rot 0 looks down x: the reference x axis becomes the viewing (z) axis."""
    a = euler_to_matrix(0.0, 90.0, 0.0)
    np.testing.assert_allclose(a @ [1, 0, 0], [0, 0, 1], atol=1e-12)


def test_euler_broadcasts_and_round_trips_numpy() -> None:
    rng = np.random.default_rng(1)
    mats = random_rotations(500, rng).reshape(5, 100, 3, 3)
    rot, tilt, psi = matrix_to_euler(mats)
    assert rot.shape == (5, 100)
    assert np.all((tilt >= 0) & (tilt <= 180))
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), mats, atol=1e-10)
    # scalar tilt broadcast against arrays
    assert euler_to_matrix(np.zeros(7), 10.0, np.zeros((3, 1))).shape == (3, 7, 3, 3)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
@pytest.mark.parametrize("rot,psi", [(0.0, 0.0), (30.0, 40.0), (-120.0, 75.0), (179.0, 179.0)])
def test_gimbal_poles_round_trip(tilt: float, rot: float, psi: float) -> None:
    a = euler_to_matrix(rot, tilt, psi)
    r2, t2, p2 = matrix_to_euler(a)
    assert float(t2) == pytest.approx(tilt, abs=1e-9)
    np.testing.assert_allclose(euler_to_matrix(r2, t2, p2), a, atol=1e-12)


def test_euler_torch_matches_numpy_and_is_differentiable(device: str) -> None:
    rng = np.random.default_rng(2)
    angles = rng.uniform(-180, 180, size=(3, 16))
    ref = euler_to_matrix(*angles)
    t = torch.tensor(angles, dtype=torch.float64, device=device, requires_grad=True)
    out = euler_to_matrix(t[0], t[1], t[2])
    np.testing.assert_allclose(out.detach().cpu().numpy(), ref, atol=1e-12)
    out[..., 0, 2].sum().backward()  # -cos(psi) sin(tilt)
    g = t.grad.cpu().numpy()
    expected = -np.cos(np.deg2rad(angles[2])) * np.cos(np.deg2rad(angles[1])) * np.pi / 180
    np.testing.assert_allclose(g[1], expected, atol=1e-12)


def test_rotvec_matches_axis_angle() -> None:
    axis = np.array([1.0, 2.0, 2.0]) / 3.0
    angle = 0.7
    r = cv.rotvec_to_matrix(axis * angle)
    # Rodrigues' formula written out independently
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    expected = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    np.testing.assert_allclose(r, expected, atol=1e-14)
    np.testing.assert_allclose(cv.cryosparc_pose_to_relion_matrix(axis * angle), expected.T, atol=1e-14)


def test_shift_units() -> None:
    assert cv.shift_angstrom_to_pixels(np.array([5.612]), 2.806)[0] == pytest.approx(2.0)
    assert cv.shift_pixels_to_angstrom(np.array([2.0]), 2.806)[0] == pytest.approx(5.612)


def test_pixel_size_rules() -> None:
    assert cv.resolve_pixel_size({"rlnImagePixelSize": 2.806, "rlnMicrographOriginalPixelSize": 1.403}) == 2.806
    # RELION 3.0: detector pixel (um) * 1e4 / magnification
    apix = cv.resolve_pixel_size({"rlnDetectorPixelSize": 5.0, "rlnMagnification": 37369.0})
    assert apix == pytest.approx(1.338, abs=5e-4)
    assert cv.resolve_pixel_size({"rlnMicrographPixelSize": 1.0}) is None
    assert cv.rescale_factor(256, 64) == 0.25


def test_electron_wavelength_reference_values() -> None:
    # Tabulated relativistic wavelengths: 300 kV 0.01969 Å, 200 kV 0.02508 Å, 100 kV 0.03701 Å
    np.testing.assert_allclose(
        cv.electron_wavelength(np.array([300.0, 200.0, 100.0])), [0.019687, 0.025079, 0.037014], atol=2e-6
    )
    assert float(cv.electron_wavelength(torch.tensor(300.0))) == pytest.approx(0.019687, abs=2e-6)


def test_box_center() -> None:
    assert cv.box_center(64) == 32 and cv.box_center(65) == 32 and cv.default_rmax(128) == 64.0
