"""Stage ``preprocess``: validated inputs → particles, reference, mask and point cloud.

Everything is at the processing box.

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
import pandas as pd

from z3lib.conventions import rescale_factor, shift_pixels_to_angstrom
from z3lib.geometry import points_from_volume
from z3lib.io import (
    ImageStack,
    Particles,
    Z3InputError,
    open_stack_writer,
    read_map,
    read_particles,
    write_map,
    write_npz,
    write_particles_star,
)
from z3lib.preprocess import PIXEL_SIZE_TOLERANCE, auto_mask, fourier_crop, normalise_images


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
    model: str | Path | None = None,
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
        particles processed per chunk at most (bounds memory; fewer for large boxes:
        :func:`chunk_for_box`).
    model
        An atomic model fitted into the reference (map frame, Å): its heavy atoms, fitted to the
        processing-box reference, are written as ``atoms.npz`` (:func:`write_atom_cloud`).
    log
        Logger for progress; default this module's.

    Returns
    -------
    name → path of every file written.
    """
    logger = log or logging.getLogger(__name__)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts = _read_particles(particles, box, pixel_size=pixel_size, image_root=image_root)
    n_in, apix_in = parts.box, parts.pixel_size
    apix = apix_in / rescale_factor(n_in, box)  # Fourier cropping N → box px
    stack = parts.images()
    stack.validate()
    ref = read_map(reference, require_isotropic=True)
    _check_map("reference", Path(reference), ref.data.shape, ref.pixel_size, parts, reference_pixel_size)
    logger.info(
        "%d particles of %d px at %.4g Å/px → processing box %d px at %.4g Å/px", len(parts), n_in, apix_in, box, apix
    )

    ref_small = fourier_crop(ref.data, box, ndim=3)
    mask_small = _processing_mask(mask, ref_small, parts, box, mask_threshold, reference_pixel_size, logger)
    paths = {
        name: out / fname
        for name, fname in (
            ("particles", "particles.star"),
            ("stack", "particles.mrcs"),
            ("reference", "reference.mrc"),
            ("mask", "mask.mrc"),
            ("points", "points.npz"),
        )
    }
    _write_stack(paths["stack"], stack, parts, box, apix, chunk_size, logger)
    stack.close()

    write_map(paths["reference"], ref_small, apix)
    write_map(paths["mask"], mask_small, apix)
    points, amplitudes = points_from_volume(ref_small, mask=mask_small, step=points_step)
    write_npz(
        paths["points"],
        points=points.astype(np.float32),
        amplitudes=amplitudes.astype(np.float32),
        box=np.int64(box),
        pixel_size=np.float64(apix),
        original_box=np.int64(n_in),
        original_pixel_size=np.float64(apix_in),
        step=np.int64(points_step),
    )
    _write_star(paths["particles"], paths["stack"].name, parts, box, apix)
    if model is not None:
        paths["atoms"] = out / "atoms.npz"
        write_atom_cloud(paths["atoms"], model, ref_small, mask_small, box, apix, n_in, apix_in, logger, points)
    logger.info("preprocess done in %.1f s: %d points in the mask", time.perf_counter() - t0, len(points))
    return paths


def write_atom_cloud(
    path: Path,
    model: str | Path,
    reference: np.ndarray,
    mask: np.ndarray,
    box: int,
    pixel_size: float,
    original_box: int,
    original_pixel_size: float,
    log: logging.Logger,
    voxels: np.ndarray | None = None,
) -> None:
    """Write ``atoms.npz``: the model's heavy atoms as the decoder's point cloud.

    Keys as ``points.npz`` (``points`` px of the processing box, ``amplitudes`` fitted to
    ``reference`` over ``mask``, boxes, pixel sizes, ``step`` 1) plus
    ``blur_px`` (the atoms' Gaussian σ, px), ``pairs`` (bonds and Cα–Cα links), ``contacts``
    (pairs more than two bonds apart within 4 Å, for the clash regulariser), ``kind`` and
    ``smooth_points``: ``voxels`` (the mask's voxel cloud, px; the atoms when None), where the
    fields' regularisers are averaged so that they stay smooth between and around the atoms.

    Raises
    ------
    Z3InputError
        The model has no heavy atom inside the box, or most of it lies outside the map's density
        (not fitted into this map, or in another frame).
    """
    from z3lib import atoms as at
    from z3lib.io import Z3InputError, read_model
    from z3lib.simulate import atom_weights

    atomic = read_model(model)
    heavy = at.heavy_atoms(atomic.elements)
    points = at.model_to_points(atomic.coords[heavy], original_pixel_size, original_box, pixel_size)
    inside = np.all(np.abs(points) < box / 2 - 1, axis=1)
    if not inside.any():
        raise Z3InputError(f"{model}: no heavy atom lies inside the {box} px box of the reference")
    support = np.zeros(len(points))
    support[inside] = _sample(mask, points[inside])
    if np.mean(support > 0.5) < 0.5:
        raise Z3InputError(
            f"{model}: only {100 * np.mean(support > 0.5):.0f} % of its heavy atoms lie inside the mask of "
            "the reference: the model must be fitted into the consensus map, in the map's frame (Å, "
            "voxel [0, 0, 0] at the origin, as RELION and cryoSPARC write maps)"
        )
    pairs = at.model_pairs(
        atomic.coords[heavy], atomic.atom_names[heavy], atomic.chain_ids[heavy], atomic.residue_numbers[heavy]
    )
    fit = at.fit_atom_amplitudes(reference, points, atom_weights(atomic.elements[heavy]), mask=mask > 0)
    write_npz(
        path,
        points=points.astype(np.float32),
        amplitudes=fit.amplitudes.astype(np.float32),
        box=np.int64(box),
        pixel_size=np.float64(pixel_size),
        original_box=np.int64(original_box),
        original_pixel_size=np.float64(original_pixel_size),
        step=np.int64(1),
        blur_px=np.float64(fit.sigma_px),
        pairs=pairs.kept,
        contacts=pairs.contacts,
        kind=np.str_("atoms"),
        smooth_points=(points if voxels is None else voxels).astype(np.float32),
    )
    log.info(
        "atoms: %d heavy atoms of %s, Gaussians of σ %.2f px fitted to the reference (correlation %.3f), "
        "%d bonds and %d Cα–Cα links",
        len(points),
        model,
        fit.sigma_px,
        fit.correlation,
        len(pairs.bonds),
        len(pairs.ca),
    )


def _sample(volume: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Nearest-voxel values of a ``[z, y, x]`` volume at points (px from its centre)."""
    idx = np.clip(np.rint(points + volume.shape[0] // 2).astype(np.int64), 0, volume.shape[0] - 1)
    return np.asarray(volume[idx[:, 2], idx[:, 1], idx[:, 0]], dtype=np.float64)


def _read_particles(
    particles: str | Path, box: int, *, pixel_size: float | None, image_root: str | Path | None
) -> Particles:
    """Read the particles, refused without poses, CTF-premultiplied or smaller than ``box``.

    Refusals are :class:`z3lib.io.Z3InputError`; ``box`` is the processing box.
    """
    parts = read_particles(particles, pixel_size=pixel_size, image_root=image_root)
    parts.require_poses("z3 starts from a consensus refinement")
    premultiplied = parts.table["ctf_premultiplied"].to_numpy(dtype=bool)
    if premultiplied.any():
        raise Z3InputError(
            f"{parts.path}: {int(premultiplied.sum())} particles are CTF-premultiplied "
            "(rlnCtfDataAreCtfPremultiplied = 1); z3 models images as CTF ∗ projection (or |CTF| ∗ "
            "projection for phase-flipped data): re-extract the particles without premultiplication"
        )
    if box > parts.box:
        raise Z3InputError(
            f"processing box {box} px is larger than the particles' box {parts.box} px in "
            f"{parts.path}; set `box` to at most {parts.box}"
        )
    return parts


def _processing_mask(
    mask: str | Path | None,
    ref_small: np.ndarray,
    parts: Particles,
    box: int,
    mask_threshold: float,
    reference_pixel_size: float | None,
    log: logging.Logger,
) -> np.ndarray:
    """Return the ``(box, box, box)`` float32 0/1 processing mask.

    The given mask cropped and thresholded, or one derived from the cropped reference ``ref_small``.
    """
    if mask is None:
        mask_small = auto_mask(ref_small)
        log.info("no mask given: derived one from the reference (%d voxels)", int(mask_small.sum()))
        return mask_small
    m = read_map(mask, require_isotropic=True)
    _check_map("mask", Path(mask), m.data.shape, m.pixel_size, parts, reference_pixel_size)
    out: np.ndarray = (fourier_crop(m.data, box, ndim=3) > mask_threshold).astype(np.float32)
    if not out.any():
        raise Z3InputError(
            f"mask {mask} is empty after thresholding at {mask_threshold}; "
            "lower `preprocess.mask_threshold` or check the mask"
        )
    return out


#: Memory the images of one preprocess chunk may take (bytes): with the full-box reference in
#: memory, the rule's declared 8 GB hold a 512 px box (1 GiB: 64 images of 512 px, 1,024 of 128 px).
CHUNK_MEMORY_BYTES = 1 << 30
#: Peak bytes per input pixel while a chunk is read, sign-corrected, Fourier-cropped (complex128
#: spectrum and its shifted copy), normalised and written (tracemalloc: 59–62 B measured).
CHUNK_BYTES_PER_PIXEL = 64


def chunk_for_box(chunk_size: int, box: int, budget: int | None = None) -> int:
    """Return the particles per preprocess chunk: ``chunk_size``, or fewer where it would not fit.

    A chunk of ``box`` px images must take at most ``budget`` bytes (default
    :data:`CHUNK_MEMORY_BYTES`) at :data:`CHUNK_BYTES_PER_PIXEL`.
    """
    limit = CHUNK_MEMORY_BYTES if budget is None else budget
    return max(1, min(chunk_size, limit // (CHUNK_BYTES_PER_PIXEL * box * box)))


def _write_stack(
    path: Path, stack: ImageStack, parts: Particles, box: int, apix: float, chunk_size: int, log: logging.Logger
) -> None:
    """Write the particles' images, sign-corrected, Fourier-cropped and normalised, to the stack ``path``.

    The images are cropped to ``box`` and written chunk by chunk into the MRCS stack; a chunk
    holds ``chunk_size`` particles or fewer, so that it stays within :data:`CHUNK_MEMORY_BYTES`
    at any input box (:func:`chunk_for_box`).
    """
    sign = parts.table["image_sign"].to_numpy(dtype=np.float32)
    n = len(parts)
    chunk = chunk_for_box(chunk_size, stack.box)
    if chunk < chunk_size:
        log.info(
            "chunks of %d particles, not %d: %d px images (%.2f GiB a chunk at most)",
            chunk,
            chunk_size,
            stack.box,
            chunk * CHUNK_BYTES_PER_PIXEL * stack.box**2 / 2**30,
        )
    chunk_size = chunk
    with open_stack_writer(path, n, box, apix) as data:
        t_start = time.perf_counter()
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            imgs = stack[np.arange(lo, hi)] * sign[lo:hi, None, None]
            data[lo:hi] = normalise_images(fourier_crop(imgs, box, ndim=2))
            done = time.perf_counter() - t_start
            rate = hi / done if done > 0 else float("inf")
            log.info("preprocessed %d/%d particles (%.0f/s, ETA %.0f s)", hi, n, rate, (n - hi) / rate)


def _write_star(path: Path, stack_name: str, parts: Particles, box: int, apix: float) -> None:
    """Write the processing box's particle STAR.

    Every input column, images in ``stack_name``, the original image names, shifts in Å (and px of
    the new box for RELION 3.0 files).
    """
    t = parts.table
    n = len(parts)
    columns = {
        "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n)],
        "rlnImageOriginalName": t["image_name"].tolist(),
        "rlnOriginXAngst": shift_pixels_to_angstrom(t["shift_x"].to_numpy(), parts.pixel_size),
        "rlnOriginYAngst": shift_pixels_to_angstrom(t["shift_y"].to_numpy(), parts.pixel_size),
        "rlnOpticsGroup": t["optics_group"].to_numpy() if parts.optics is not None else np.ones(n, dtype=int),
    }
    if "rlnOriginX" in parts.raw:
        columns["rlnOriginX"] = columns["rlnOriginXAngst"] / apix  # RELION 3.0 column: px of the new box
        columns["rlnOriginY"] = columns["rlnOriginYAngst"] / apix
    write_particles_star(path, parts, columns=columns, optics=_optics_for_output(parts, apix, box))


def _check_map(
    kind: str, path: Path, shape: tuple[int, ...], pixel: float, particles: Particles, override: float | None
) -> None:
    """Check that a map is at the particles' box and pixel size (``override``: the config's).

    Else raise a :class:`z3lib.io.Z3InputError` that says what to give.
    """
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
    """Return the output STAR's optics table at ``box`` px of ``pixel_size`` Å.

    The input's optics table, or one group for RELION 3.0 files.
    """
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
        optics = pd.DataFrame(
            {
                "rlnOpticsGroup": [1],
                "rlnOpticsGroupName": ["opticsGroup1"],
                "rlnVoltage": [float(first["voltage"])],
                "rlnSphericalAberration": [float(first["cs"])],
                "rlnAmplitudeContrast": [float(first["amplitude_contrast"])],
            }
        )
    optics["rlnImagePixelSize"] = float(pixel_size)
    optics["rlnImageSize"] = int(box)
    optics["rlnImageDimensionality"] = 2
    return optics
