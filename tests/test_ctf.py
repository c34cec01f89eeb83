"""CTF against the analytic model: sign at s = 0, zeros, astigmatism axis, filters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from z3lib.ctf import CtfParams, apply_ctf, compute_ctf, evaluate_ctf, phase_flip, wiener_filter


def _lam(kv: float) -> float:
    v = kv * 1e3
    return 12.2643247 / math.sqrt(v * (1 + 0.978466e-6 * v))


def _numpy_ctf(
    box: int,
    apix: float,
    du: float,
    dv: float,
    ang: float,
    kv: float,
    cs: float,
    w: float,
    phase: float = 0.0,
    bfac: float = 0.0,
) -> np.ndarray:
    """Independent numpy CTF on the rfft2 grid of a [y, x] image (rows y, columns x)."""
    sy = np.fft.fftfreq(box, d=apix)[:, None]
    sx = np.fft.rfftfreq(box, d=apix)[None, :]
    s2 = sx**2 + sy**2
    alpha = np.arctan2(sy, sx)
    df = 0.5 * (du + dv) + 0.5 * (du - dv) * np.cos(2 * (alpha - np.deg2rad(ang)))
    lam = _lam(kv)
    gamma = -np.pi * lam * df * s2 + 0.5 * np.pi * cs * 1e7 * lam**3 * s2**2 - np.deg2rad(phase)
    return -(np.sqrt(1 - w * w) * np.sin(gamma) - w * np.cos(gamma)) * np.exp(-bfac * s2 / 4)


@pytest.mark.parametrize("w", [0.07, 0.1, 0.3])
def test_ctf_at_zero_frequency_is_plus_q0(w: float, device: str) -> None:
    p = CtfParams.create([15000.0, 25000.0], [14000.0, 24000.0], 33.0, 300.0, 2.7, w, device=device)
    ctf = compute_ctf(64, 1.5, p)
    assert ctf.shape == (2, 64, 33)
    np.testing.assert_allclose(ctf[:, 0, 0].cpu().numpy(), [w, w], rtol=1e-6)


def test_zeros_without_aberration_and_amplitude_contrast() -> None:
    """Cs = 0, w = 0: CTF = sin(π λ Δf s²), zeros at s = sqrt(n / (λ Δf))."""
    df, kv = 20000.0, 300.0
    n = np.arange(1, 8)
    s = np.sqrt(n / (_lam(kv) * df))
    p = CtfParams.create(df, df, 0.0, kv, 0.0, 0.0, dtype=torch.float64)
    values = evaluate_ctf(torch.tensor(s), torch.zeros(len(s), dtype=torch.float64), p)[0].numpy()
    np.testing.assert_allclose(values, 0.0, atol=1e-9)
    # and the extrema between zeros are ±1
    mid = np.sqrt((n - 0.5) / (_lam(kv) * df))
    extrema = evaluate_ctf(torch.tensor(mid), torch.zeros(len(mid), dtype=torch.float64), p)[0].numpy()
    np.testing.assert_allclose(np.abs(extrema), 1.0, atol=1e-9)


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 135.0])
def test_zeros_with_cs_q0_and_astigmatism_axis(angle: float) -> None:
    """With Cs and w, zeros solve (π/2)Cs λ³ s⁴ − π λ Δf s² = atan(w/√(1−w²)) − nπ, where Δf is
    DefocusU along the astigmatism angle (from the x axis) and DefocusV perpendicular to it."""
    du, dv, kv, cs, w = 22000.0, 18000.0, 200.0, 2.7, 0.1
    lam = _lam(kv)
    p = CtfParams.create(du, dv, angle, kv, cs, w, dtype=torch.float64)
    for df, direction in ((du, angle), (dv, angle + 90.0)):
        a, b = 0.5 * np.pi * cs * 1e7 * lam**3, -np.pi * lam * df
        zeros = []
        for n in range(1, 6):
            target = math.atan2(w, math.sqrt(1 - w * w)) - n * np.pi
            roots = np.roots([a, b, -target])
            u = min(r.real for r in roots if abs(r.imag) < 1e-12 and r.real > 0)
            zeros.append(math.sqrt(u))
        s = np.array(zeros)
        th = np.deg2rad(direction)
        vals = evaluate_ctf(torch.tensor(s * np.cos(th)), torch.tensor(s * np.sin(th)), p)[0].numpy()
        np.testing.assert_allclose(vals, 0.0, atol=1e-8)


def test_grid_matches_independent_numpy_model(device: str) -> None:
    args = {"du": 21000.0, "dv": 17000.0, "ang": -40.0, "kv": 300.0, "cs": 2.7, "w": 0.1, "phase": 20.0, "bfac": 50.0}
    p = CtfParams.create(
        args["du"],
        args["dv"],
        args["ang"],
        args["kv"],
        args["cs"],
        args["w"],
        args["phase"],
        args["bfac"],
        device=device,
        dtype=torch.float64,
    )
    ours = compute_ctf(48, 1.7, p)[0].cpu().numpy()
    np.testing.assert_allclose(ours, _numpy_ctf(48, 1.7, **args), atol=1e-12)
    full = compute_ctf(47, 1.7, p, rfft=False)[0].cpu().numpy()
    # a real even filter: CTF(s) = CTF(-s) (odd box: every frequency has its mirror on the grid)
    np.testing.assert_allclose(full, np.roll(full[::-1, ::-1], 1, axis=(0, 1)), atol=1e-12)


def test_apply_ctf_equals_fourier_product(device: str) -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, 40, 40))
    params = {"du": 12000.0, "dv": 10000.0, "ang": 25.0, "kv": 300.0, "cs": 2.7, "w": 0.1}
    p = CtfParams.create(
        params["du"],
        params["dv"],
        params["ang"],
        params["kv"],
        params["cs"],
        params["w"],
        device=device,
        dtype=torch.float64,
    )
    out = apply_ctf(torch.tensor(img, device=device), 2.0, p, pad=1).cpu().numpy()
    expected = np.fft.irfft2(np.fft.rfft2(img) * _numpy_ctf(40, 2.0, **params), s=(40, 40))
    np.testing.assert_allclose(out, expected, atol=1e-10)
    # padded: the result is the central crop of the padded product
    padded = np.zeros((2, 80, 80))
    padded[:, 20:60, 20:60] = img
    expected2 = np.fft.irfft2(np.fft.rfft2(padded) * _numpy_ctf(80, 2.0, **params), s=(80, 80))[:, 20:60, 20:60]
    out2 = apply_ctf(torch.tensor(img, device=device), 2.0, p, pad=2).cpu().numpy()
    np.testing.assert_allclose(out2, expected2, atol=1e-10)


def test_phase_flip_and_phase_flipped_model() -> None:
    rng = np.random.default_rng(1)
    img = torch.tensor(rng.normal(size=(1, 32, 32)))
    p = CtfParams.create(15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1, dtype=torch.float64)
    flipped = phase_flip(apply_ctf(img, 1.5, p, pad=1), 1.5, p)
    np.testing.assert_allclose(flipped.numpy(), apply_ctf(img, 1.5, p, pad=1, phase_flipped=True).numpy(), atol=1e-10)


def test_wiener_inverts_ctf_where_it_is_strong() -> None:
    rng = np.random.default_rng(2)
    img = rng.normal(size=(1, 64, 64))
    p = CtfParams.create(15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1, dtype=torch.float64)
    blurred = apply_ctf(torch.tensor(img), 1.5, p, pad=1)
    restored = wiener_filter(blurred, 1.5, p, epsilon=1e-6).numpy()
    ctf = _numpy_ctf(64, 1.5, 15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1)
    strong = np.abs(ctf) > 0.3
    np.testing.assert_allclose(np.fft.rfft2(restored)[0][strong], np.fft.rfft2(img)[0][strong], rtol=1e-4, atol=1e-4)


def test_ctf_is_differentiable_in_defocus() -> None:
    du = torch.tensor([15000.0], dtype=torch.float64, requires_grad=True)
    p = CtfParams(
        du, du * 1.0, *(torch.tensor([v], dtype=torch.float64) for v in (0.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0))
    )
    s = torch.tensor([0.05], dtype=torch.float64)
    val = evaluate_ctf(s, torch.zeros(1, dtype=torch.float64), p).sum()
    val.backward()
    h = 1e-2

    def f(d: float) -> float:
        q = CtfParams.create(d, d, 0.0, 300.0, 2.7, 0.1, dtype=torch.float64)
        return float(evaluate_ctf(s, torch.zeros(1, dtype=torch.float64), q).sum())

    assert float(du.grad) == pytest.approx((f(15000.0 + h) - f(15000.0 - h)) / (2 * h), rel=1e-5)
