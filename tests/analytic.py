"""Closed-form references for the tests, written from docs/conventions.md and textbook formulas only.

Nothing here imports z3lib: tests compare z3's results with these, so that a test never checks a
function against itself. Conventions are docs/conventions.md's: images ``[y, x]``, image centre
``box // 2``, positions ``(x, y, z)`` px from the centre, RELION's ``A`` and shift sign (a map
point ``p`` lands at ``(A p)_xy − s``), RELION's CTF with CTF(0) = +Q0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength (Å) at ``voltage_kv`` kV: docs/conventions.md's formula."""
    v = voltage_kv * 1e3
    return float(12.2643247 / np.sqrt(v * (1.0 + 0.978466e-6 * v)))


def relion_matrix(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """RELION's ``A`` from Euler angles in degrees (``(n,)`` each), rows exactly as docs/conventions.md
    writes them; ``(n, 3, 3)``."""
    f, t, p = np.deg2rad(rot), np.deg2rad(tilt), np.deg2rad(psi)
    cf, sf, ct, st, cp, sp = np.cos(f), np.sin(f), np.cos(t), np.sin(t), np.cos(p), np.sin(p)
    rows = [
        [cp * ct * cf - sp * sf, cp * ct * sf + sp * cf, -cp * st],
        [-sp * ct * cf - cp * sf, -sp * ct * sf + cp * cf, sp * st],
        [st * cf, st * sf, ct],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def relion_ctf(
    kx: np.ndarray,
    ky: np.ndarray,
    pixel_size: float,
    defocus_u: float,
    defocus_v: float,
    defocus_angle: float,
    *,
    voltage: float = 300.0,
    cs_mm: float = 2.7,
    q0: float = 0.1,
) -> np.ndarray:
    """RELION's CTF (its ``ctf.h``; docs/conventions.md) at frequencies ``kx, ky`` in cycles/px.

    ``sin(χ + arcsin Q0)`` with ``χ = πλΔf s² − (π/2) Cs λ³ s⁴``, ``Δf`` the astigmatic defocus
    along the frequency's azimuth (U, V in Å, angle in degrees), ``s`` in 1/Å: CTF(0) = +Q0,
    positive in the first lobe. No phase shift, no B-factor.
    """
    lam = electron_wavelength(voltage)
    sx, sy = kx / pixel_size, ky / pixel_size
    s2 = sx**2 + sy**2
    df = 0.5 * (defocus_u + defocus_v) + 0.5 * (defocus_u - defocus_v) * np.cos(
        2.0 * (np.arctan2(sy, sx) - np.deg2rad(defocus_angle))
    )
    chi = np.pi * lam * df * s2 - 0.5 * np.pi * cs_mm * 1e7 * lam**3 * s2**2
    return np.asarray(np.sin(chi + np.arcsin(q0)))


def gaussian_volume(
    box: int, centres: Sequence[Sequence[float]], amplitudes: Sequence[float], sigma: float
) -> np.ndarray:
    """``(box, box, box)`` ``[z, y, x]`` sum of isotropic Gaussians ``a·exp(−|r − c|²/2σ²)``,
    centres ``(x, y, z)`` px from the box centre, σ px."""
    zz, yy, xx = np.meshgrid(*[np.arange(box) - box // 2] * 3, indexing="ij")
    vol = np.zeros((box,) * 3)
    for (cx, cy, cz), a in zip(centres, amplitudes, strict=True):
        vol += a * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2) / (2 * sigma**2))
    return vol


def gaussian_image(
    box: int,
    positions: Sequence[Sequence[float]],
    amplitudes: Sequence[float],
    sigma: float,
    transfer: np.ndarray | None = None,
    fine: int = 512,
) -> np.ndarray:
    """``(box, box)`` ``[y, x]`` projection of isotropic 3D Gaussians (peaks ``amplitudes``, σ px)
    whose centres project to ``positions`` (x, y px from the image centre ``box // 2``), filtered
    by ``transfer`` (an ``(fine, fine)`` filter on ``np.fft.fftfreq(fine)`` cycles/px, ``[ky, kx]``;
    None = no filter).

    Closed form: each Gaussian projects to ``a·√(2π)σ·exp(−|ρ − q|²/2σ²)``, of 2D transform
    ``a·√(2π)σ·2πσ²·exp(−2π²σ²|k|²)·exp(−2πi k·q)``; the filtered image is the continuous
    inverse transform, summed on a ``fine``-px-periodic grid (``fine`` ≫ box: no wrap-around).
    """
    k = np.fft.fftfreq(fine)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    envelope = np.sqrt(2 * np.pi) * sigma * 2 * np.pi * sigma**2 * np.exp(-2 * np.pi**2 * sigma**2 * (kx**2 + ky**2))
    spectrum = np.zeros((fine, fine), dtype=complex)
    for (qx, qy), a in zip(positions, amplitudes, strict=True):
        spectrum += a * envelope * np.exp(-2j * np.pi * (kx * qx + ky * qy))
    if transfer is not None:
        spectrum = spectrum * transfer
    image = np.fft.ifft2(spectrum).real
    idx = (np.arange(box) - box // 2) % fine
    return np.asarray(image[np.ix_(idx, idx)])


def fine_frequencies(fine: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``(kx, ky)`` ``(fine, fine)`` grids of ``np.fft.fftfreq(fine)`` cycles/px, ``[ky, kx]``."""
    k = np.fft.fftfreq(fine)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    return kx, ky
