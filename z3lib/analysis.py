"""Analysis of maps and landscapes: Fourier shell correlation, resolution, filtering.

Maps are ``[z, y, x]`` numpy arrays; frequencies are in cycles/Å.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd


def _shell_index(shape: tuple[int, ...]) -> np.ndarray:
    """Integer radius (in Fourier pixels of the full grid) of every rfftn sample of ``shape``."""
    n = shape[-1]
    axes = [np.fft.fftfreq(s) * n for s in shape[:-1]] + [np.fft.rfftfreq(shape[-1]) * n]
    grids = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids))
    out: np.ndarray = np.round(r).astype(np.int64)
    return out


def fourier_shell_correlation(a: npt.ArrayLike, b: npt.ArrayLike, pixel_size: float) -> pd.DataFrame:
    """FSC between two maps of the same cubic box, shell by shell up to Nyquist.

    Returns
    -------
    a table with ``shell`` (Fourier pixels), ``frequency`` (1/Å), ``resolution`` (Å) and
    ``fsc``, one row per shell from 1 to ``box // 2``.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or len(set(x.shape)) != 1:
        raise ValueError(f"FSC needs two maps of the same cubic box, got {x.shape} and {y.shape}")
    n = x.shape[-1]
    fa, fb = np.fft.rfftn(x), np.fft.rfftn(y)
    shells = _shell_index(x.shape).ravel()
    n_shells = n // 2
    cross = np.bincount(shells, weights=(fa * fb.conj()).real.ravel(), minlength=n_shells + 2)
    pa = np.bincount(shells, weights=(np.abs(fa) ** 2).ravel(), minlength=n_shells + 2)
    pb = np.bincount(shells, weights=(np.abs(fb) ** 2).ravel(), minlength=n_shells + 2)
    k = np.arange(1, n_shells + 1)
    fsc = cross[k] / np.sqrt(np.maximum(pa[k] * pb[k], 1e-30))
    freq = k / (n * pixel_size)
    return pd.DataFrame({"shell": k, "frequency": freq, "resolution": 1.0 / freq, "fsc": fsc})


def resolution_at(fsc: pd.DataFrame, threshold: float = 0.143) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold`` (linear interpolation between
    shells); Nyquist if it never does."""
    f, c = fsc["frequency"].to_numpy(), fsc["fsc"].to_numpy()
    below = np.nonzero(c < threshold)[0]
    if len(below) == 0:
        return float(1.0 / f[-1])
    i = int(below[0])
    if i == 0:
        return float(1.0 / f[0])
    t = (c[i - 1] - threshold) / (c[i - 1] - c[i])
    return float(1.0 / (f[i - 1] + t * (f[i] - f[i - 1])))


def fsc_area(fsc: pd.DataFrame) -> float:
    """Mean FSC over the shells up to Nyquist (the area under the curve on a unit frequency axis)."""
    return float(fsc["fsc"].mean())


def lowpass_filter(volume: npt.ArrayLike, pixel_size: float, resolution: float, *, width: float = 0.02) -> np.ndarray:
    """Low-pass a map at ``resolution`` Å with a raised-cosine edge ``width`` (1/Å) wide."""
    v = np.asarray(volume, dtype=np.float64)
    n = v.shape[-1]
    axes = [np.fft.fftfreq(s, d=pixel_size) for s in v.shape[:-1]] + [np.fft.rfftfreq(v.shape[-1], d=pixel_size)]
    grids = np.meshgrid(*axes, indexing="ij")
    s = np.sqrt(sum(g**2 for g in grids))
    cut = 1.0 / resolution
    ramp = np.clip((s - (cut - width / 2)) / width, 0.0, 1.0)
    filt = 0.5 * (1 + np.cos(np.pi * ramp))
    out: np.ndarray = np.fft.irfftn(np.fft.rfftn(v) * filt, s=v.shape, axes=tuple(range(v.ndim)))
    return out.astype(np.float32)
