"""Preprocess: validated inputs → particles, reference, mask and point cloud at the processing box.

The particles are Fourier-cropped to the processing box and normalised chunk by chunk into a
memory-mapped stack (the input stack is never held in RAM). The reference and the mask are
Fourier-cropped the same way; the point cloud is the mask's voxels with the reference's values.
A reference whose pixel size or box disagrees with the particles is an error, never silently
resampled.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from z3lib.conventions import box_center, rescale_factor, shift_pixels_to_angstrom
from z3lib.geometry import points_from_volume, threshold_mask
from z3lib.io import (
    Particles,
    Z3InputError,
    open_stack_writer,
    read_map,
    read_particles,
    write_map,
    write_npz,
    write_particles_star,
)

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
        logging.getLogger(__name__).warning("%d of %d images have a flat (noise-free) background: centred but not rescaled",
                       int(flat.sum()), len(images))
    std = np.where(flat, 1.0, std)
    out: np.ndarray = ((images - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
    return out


def auto_mask(reference: np.ndarray, *, fraction: float = 0.05, dilate: int = 2) -> np.ndarray:
    """A mask derived from a user's map (see :func:`z3lib.geometry.threshold_mask`). Noisy maps
    reconstructed from the particles get :func:`z3lib.consensus.mask_from_map` instead."""
    return threshold_mask([reference], fraction=fraction, dilate=dilate)


def _check_map(kind: str, path: Path, shape: tuple[int, ...], pixel: float, particles: Particles,
               override: float | None) -> None:
    n = particles.box
    if shape != (n, n, n):
        raise Z3InputError(
            f"{kind} {path} is {shape[::-1]} voxels but the particles in {particles.path} are {n} px; "
            f"give a {kind} at the particles' box ({n}³ at {particles.pixel_size:.4g} Å/px). "
            "z3 does not silently resample maps."
        )
    ref_px = override if override is not None else pixel
    if not math.isclose(ref_px, particles.pixel_size, rel_tol=PIXEL_SIZE_TOLERANCE):
        raise Z3InputError(
            f"{kind} {path} has pixel size {ref_px:.4g} Å (from its header) but the particles in "
            f"{particles.path} have {particles.pixel_size:.4g} Å (from their metadata). If the map "
            "header is wrong, set `reference_pixel_size` in the config; otherwise resample the map "
            "to the particles' pixel size."
        )


def _optics_for_output(particles: Particles, pixel_size: float, box: int) -> pd.DataFrame:
    if particles.optics is not None:
        optics = particles.optics.copy()
    else:
        t = particles.table
        first = t.iloc[0]
        for col in ("voltage", "cs", "amplitude_contrast"):
            if not np.allclose(t[col].to_numpy(), float(first[col])):
                raise Z3InputError(
                    f"{particles.path}: RELION 3.0 particles with varying {col} need optics groups; "
                    "convert the file with RELION 3.1+ (relion_convert_star) first"
                )
        optics = pd.DataFrame({
            "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnVoltage": [float(first["voltage"])], "rlnSphericalAberration": [float(first["cs"])],
            "rlnAmplitudeContrast": [float(first["amplitude_contrast"])],
        })
    optics["rlnImagePixelSize"] = float(pixel_size)
    optics["rlnImageSize"] = int(box)
    optics["rlnImageDimensionality"] = 2
    return optics


def preprocess(
    particles: str | Path,
    reference: str | Path,
    mask: str | Path | None,
    out_dir: str | Path,
    *,
    box: int,
    pixel_size: float | None = None,
    image_root: str | Path | None = None,
    reference_pixel_size: float | None = None,
    mask_threshold: float = 0.5,
    points_step: int = 1,
    chunk_size: int = 1024,
    log: logging.Logger | None = None,
) -> dict[str, Path]:
    """Validate the inputs and write everything later stages read, at the processing box.

    Parameters
    ----------
    particles
        RELION STAR or cryoSPARC ``.cs`` with poses and CTF.
    reference, mask
        consensus map and optional mask (``None``: a mask is derived from the reference), at the
        particles' box and pixel size.
    out_dir
        where ``particles.star``, ``particles.mrcs``, ``reference.mrc``, ``mask.mrc`` and
        ``points.npz`` are written (each atomically).
    box
        processing box (px), ≤ the particles' box.
    pixel_size, image_root
        overrides for :func:`z3lib.io.read_particles`.
    reference_pixel_size
        override for a map header that is wrong.
    mask_threshold
        a voxel belongs to the mask when its (cropped) mask value exceeds this.
    points_step
        keep every ``step``-th voxel per axis for the point cloud.
    chunk_size
        particles processed per chunk (bounds memory).

    Returns
    -------
    name → path of every file written.
    """
    logger = log or logging.getLogger(__name__)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts = read_particles(particles, pixel_size=pixel_size, image_root=image_root)
    parts.require_poses("z3 starts from a consensus refinement")
    premultiplied = parts.table["ctf_premultiplied"].to_numpy(dtype=bool)
    if premultiplied.any():
        raise Z3InputError(
            f"{parts.path}: {int(premultiplied.sum())} particles are CTF-premultiplied "
            "(rlnCtfDataAreCtfPremultiplied = 1); z3 models images as CTF ∗ projection (or |CTF| ∗ "
            "projection for phase-flipped data): re-extract the particles without premultiplication"
        )
    n_in, apix_in = parts.box, parts.pixel_size
    if box > n_in:
        raise Z3InputError(f"processing box {box} px is larger than the particles' box {n_in} px in {parts.path}; "
                           f"set `box` to at most {n_in}")
    apix = apix_in / rescale_factor(n_in, box)  # Fourier cropping N → box px
    stack = parts.images()
    stack.validate()
    ref = read_map(reference, require_isotropic=True)
    _check_map("reference", Path(reference), ref.data.shape, ref.pixel_size, parts, reference_pixel_size)
    logger.info("%d particles of %d px at %.4g Å/px → processing box %d px at %.4g Å/px",
                len(parts), n_in, apix_in, box, apix)

    ref_small = fourier_crop(ref.data, box, ndim=3)
    if mask is not None:
        m = read_map(mask, require_isotropic=True)
        _check_map("mask", Path(mask), m.data.shape, m.pixel_size, parts, reference_pixel_size)
        mask_small = (fourier_crop(m.data, box, ndim=3) > mask_threshold).astype(np.float32)
        if not mask_small.any():
            raise Z3InputError(f"mask {mask} is empty after thresholding at {mask_threshold}; "
                               "lower `preprocess.mask_threshold` or check the mask")
    else:
        mask_small = auto_mask(ref_small)
        logger.info("no mask given: derived one from the reference (%d voxels)", int(mask_small.sum()))

    paths = {name: out / fname for name, fname in (
        ("particles", "particles.star"), ("stack", "particles.mrcs"), ("reference", "reference.mrc"),
        ("mask", "mask.mrc"), ("points", "points.npz"),
    )}
    sign = parts.table["image_sign"].to_numpy(dtype=np.float32)
    n = len(parts)
    with open_stack_writer(paths["stack"], n, box, apix) as data:
        t_start = time.perf_counter()
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            imgs = stack[np.arange(lo, hi)] * sign[lo:hi, None, None]
            data[lo:hi] = normalise_images(fourier_crop(imgs, box, ndim=2))
            done = time.perf_counter() - t_start
            rate = hi / done if done > 0 else float("inf")
            logger.info("preprocessed %d/%d particles (%.0f/s, ETA %.0f s)", hi, n, rate, (n - hi) / rate)
    stack.close()

    write_map(paths["reference"], ref_small, apix)
    write_map(paths["mask"], mask_small, apix)
    points, amplitudes = points_from_volume(ref_small, mask=mask_small, step=points_step)
    write_npz(paths["points"], points=points.astype(np.float32), amplitudes=amplitudes.astype(np.float32),
              box=np.int64(box), pixel_size=np.float64(apix), original_box=np.int64(n_in),
              original_pixel_size=np.float64(apix_in), step=np.int64(points_step))
    t = parts.table
    columns = {
        "rlnImageName": [f"{i + 1:06d}@{paths['stack'].name}" for i in range(n)],
        "rlnImageOriginalName": t["image_name"].tolist(),
        "rlnOriginXAngst": shift_pixels_to_angstrom(t["shift_x"].to_numpy(), apix_in),
        "rlnOriginYAngst": shift_pixels_to_angstrom(t["shift_y"].to_numpy(), apix_in),
        "rlnOpticsGroup": t["optics_group"].to_numpy() if parts.optics is not None else np.ones(n, dtype=int),
    }
    if "rlnOriginX" in parts.raw:
        columns["rlnOriginX"] = columns["rlnOriginXAngst"] / apix  # RELION 3.0 column: px of the new box
        columns["rlnOriginY"] = columns["rlnOriginYAngst"] / apix
    write_particles_star(paths["particles"], parts, columns=columns,
                         optics=_optics_for_output(parts, apix, box))
    logger.info("preprocess done in %.1f s: %d points in the mask", time.perf_counter() - t0, len(points))
    return paths
