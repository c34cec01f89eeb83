"""Preprocessing's array-level steps: Fourier cropping, image normalisation and the automatic mask.

The stage itself, files in and out, is :mod:`z3lib.stages.preprocess`.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from z3lib.conventions import box_center
from z3lib.geometry import threshold_mask

#: Relative pixel-size mismatch tolerated between the particles and the reference map.
PIXEL_SIZE_TOLERANCE = 0.005


def _crop_spectrum_shift(big: int, small: int) -> float:
    """Sub-pixel shift (small px) that keeps the centre ``big // 2`` at ``small // 2``."""
    return float(box_center(small) - box_center(big) * small / big)


def fourier_crop(array: npt.ArrayLike, size: int, *, ndim: int) -> np.ndarray:
    """Fourier-crop the last ``ndim`` axes of an array from N to ``size`` samples per axis.

    Keeps the frequencies |k| < size/2 (a sinc low-pass and resampling to pixel size
    ``p · N / size``); the value scale is preserved (a constant stays the same constant), and the
    box centre ``N // 2`` stays at ``size // 2`` for odd and even sizes alike.

    Parameters
    ----------
    array
        ``(..., N, N)`` images (``ndim=2``) or ``(N, N, N)`` volumes (``ndim=3``).
    size
        output side (≤ N).
    ndim
        Number of trailing axes to crop: 2 (images) or 3 (volumes).

    Returns
    -------
    float32 array with the last ``ndim`` axes of length ``size``.
    """
    a = np.asarray(array, dtype=np.float64)
    n = a.shape[-1]
    if any(s != n for s in a.shape[-ndim:]):
        raise ValueError(f"fourier_crop needs square/cubic data, got shape {a.shape}")
    if size > n:
        raise ValueError(f"fourier_crop cannot enlarge {n} px to {size} px")
    if size == n:
        return a.astype(np.float32)
    axes = tuple(range(-ndim, 0))
    spec = np.fft.fftshift(np.fft.fftn(a, axes=axes), axes=axes)
    lo = box_center(n) - box_center(size)
    sl = (Ellipsis,) + (slice(lo, lo + size),) * ndim
    cropped = np.fft.ifftshift(spec[sl], axes=axes)
    delta = _crop_spectrum_shift(n, size)
    if delta != 0.0:
        k = np.fft.fftfreq(size)
        for ax in axes:
            shape = [1] * cropped.ndim
            shape[ax] = size
            cropped = cropped * np.exp(-2j * np.pi * k * delta).reshape(shape)
    out: np.ndarray = (np.fft.ifftn(cropped, axes=axes).real * (size / n) ** ndim).astype(np.float32)
    return out


def normalise_images(images: np.ndarray, *, radius_fraction: float = 0.8) -> np.ndarray:
    """Normalise each image to zero mean and unit standard deviation of its background.

    The background is every pixel outside a circle of radius ``radius_fraction · N / 2`` around
    the centre (RELION's convention: the particle sits inside the circle). An image whose
    background is flat (standard deviation below 1e-4 of the image's largest magnitude: noise-free
    synthetic data, round-off only) keeps its scale: dividing by round-off would blow it up by
    orders of magnitude and make it inconsistent with the others.

    Parameters
    ----------
    images
        ``(B, N, N)``.
    radius_fraction
        Radius of the particle circle as a fraction of ``N / 2``.

    Returns
    -------
    ``(B, N, N)`` float32.
    """
    n = images.shape[-1]
    c = box_center(n)
    yy, xx = np.mgrid[:n, :n]
    outside = (yy - c) ** 2 + (xx - c) ** 2 > (radius_fraction * n / 2) ** 2
    bg = images[:, outside]
    mean = bg.mean(axis=1)
    std = bg.std(axis=1)
    peak = np.abs(images).reshape(len(images), -1).max(axis=1)
    flat = std <= 1e-4 * peak
    if flat.any():
        logging.getLogger(__name__).warning(
            "%d of %d images have a flat (noise-free) background: centred but not rescaled",
            int(flat.sum()),
            len(images),
        )
    std = np.where(flat, 1.0, std)
    out: np.ndarray = ((images - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
    return out


def auto_mask(reference: np.ndarray, *, fraction: float = 0.05, dilate: int = 2) -> np.ndarray:
    """Return a mask derived from a user's map (see :func:`z3lib.geometry.threshold_mask`).

    Noisy maps reconstructed from the particles get :func:`z3lib.consensus.mask_from_map` instead.
    """
    return threshold_mask([reference], fraction=fraction, dilate=dilate)
