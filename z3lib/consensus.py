"""A consensus map and its mask from the particles alone.

What a consensus refinement hands to z3 is a map reconstructed from the very particles being
analysed (every conformation averaged together) and a mask made from that map. The demo and the
benchmarks build theirs the same way, so that nothing derived from ground truth reaches a stage's
inputs: the particles with their poses and CTFs are reconstructed with ZART (zero fields) over a
ball, as two gold-standard halves; the half-map average is filtered at its FSC = 0.143 resolution
(and optionally further), and the mask is the map's main body above a threshold, dilated.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["consensus_reference", "mask_from_map", "reconstruct_consensus"]


def mask_from_map(
    volume: npt.ArrayLike,
    pixel_size: float,
    *,
    lowpass: float = 12.0,
    fraction: float = 0.1,
    dilate: float = 4.0,
    min_dilate: int = 2,
) -> np.ndarray:
    """Binary ``[z, y, x]`` mask of a map's main body, as a user would make it from the map.

    The map is low-passed to ``lowpass`` Å (so that noise and fine density do not make holes),
    thresholded at ``fraction`` of its maximum, reduced to its largest connected component with
    holes filled, dilated by ``dilate`` Å (at least ``min_dilate`` voxels) and kept inside the ball
    of radius box/2 − 1.

    Parameters
    ----------
    volume
        ``(N, N, N)`` map.
    pixel_size
        Å per voxel.
    lowpass, dilate
        Å.
    fraction
        threshold as a fraction of the low-passed map's maximum (0 < fraction < 1).
    min_dilate
        Least dilation, in voxels (applies when ``dilate`` is under this many voxels).

    Returns
    -------
    float32 0/1 ``(N, N, N)``.
    """
    from scipy import ndimage

    from z3lib.analysis import lowpass_filter
    from z3lib.geometry import sphere_mask

    vol = np.asarray(volume, dtype=np.float64)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"a mask is made from a cubic [z, y, x] map, got shape {vol.shape}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    box = vol.shape[0]
    smooth = lowpass_filter(vol, pixel_size, max(lowpass, 2.0 * pixel_size))
    peak = float(smooth.max())
    if peak <= 0:
        raise ValueError("the map has no positive density to derive a mask from")
    body = smooth > fraction * peak
    labels, count = ndimage.label(body)
    if count > 1:
        sizes = ndimage.sum(body, labels, index=np.arange(1, count + 1))
        body = labels == (1 + int(np.argmax(sizes)))
    body = ndimage.binary_fill_holes(body)
    steps = max(int(min_dilate), round(dilate / pixel_size))
    if steps > 0:
        body = ndimage.binary_dilation(body, structure=ndimage.generate_binary_structure(3, 1), iterations=steps)
    out: np.ndarray = (body & sphere_mask(box, box / 2 - 1)).astype(np.float32)
    return out


def reconstruct_consensus(
    images: object,
    table: object,
    subsets: npt.ArrayLike,
    box: int,
    pixel_size: float,
    *,
    radius_fraction: float = 0.4,
    iterations: int = 2,
    lowpass: float | None = None,
    seed: int = 0,
    backend: str = "auto",
    log: logging.Logger | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Gold-standard ZART reconstruction (zero fields) of every particle over a ball.

    Parameters
    ----------
    images
        indexable ``(n, box, box)`` stack (e.g. :class:`z3lib.io.ImageStack`).
    table
        canonical particle table (poses, shifts in px, CTF) for the ``n`` particles.
    subsets
        ``(n,)`` ``rlnRandomSubset`` values (1/2; anything else: a seeded split).
    box, pixel_size
        px and Å/px of the images.
    radius_fraction
        the ball's radius as a fraction of the box (the particle must fit inside).
    iterations
        ZART iterations.
    lowpass
        an extra low-pass (Å) after the FSC = 0.143 filter; ``None`` for none.
    seed
        Seed of the half-set split (where ``subsets`` does not give it) and of ZART's image order.
    backend
        ZART back end: ``"auto"``, ``"numpy"`` or ``"cupy"`` (:func:`z3lib.zart.get_backend`).
    log
        Logger for progress; default this module's.

    Returns
    -------
    ``(box, box, box)`` float32 map and ``{"resolution_0143": Å, "resolution_05": Å, "seconds": s}``.
    """
    from z3lib.analysis import fourier_shell_correlation, lowpass_filter, resolution_at
    from z3lib.geometry import points_from_mask, sphere_mask
    from z3lib.zart import (
        ZartConfig,
        get_backend,
        half_sets,
        reconstruct_zart,
        soft_support,
        values_to_volume,
    )

    logger = log or logging.getLogger(__name__)
    t0 = time.perf_counter()
    be = get_backend(backend, logger)
    points, _ = points_from_mask(sphere_mask(box, radius_fraction * box))
    config = ZartConfig(iterations=iterations, seed=seed)
    halves = []
    for h, rows in enumerate(half_sets(subsets, seed), start=1):
        vals, _ = reconstruct_zart(
            be,
            points,
            None,
            None,
            images,
            table,
            rows,
            box,
            pixel_size,
            config,
            log=logger,
            label=f" consensus half {h}",
        )
        halves.append(values_to_volume(vals, points, box))
    support = soft_support(points, box)
    fsc = fourier_shell_correlation(halves[0] * support, halves[1] * support, pixel_size)
    res = resolution_at(fsc, 0.143)
    volume = lowpass_filter(0.5 * (halves[0] + halves[1]), pixel_size, res)
    if lowpass is not None and lowpass > res:
        volume = lowpass_filter(volume, pixel_size, lowpass)
    stats = {
        "resolution_0143": float(res),
        "resolution_05": float(resolution_at(fsc, 0.5)),
        "seconds": time.perf_counter() - t0,
    }
    logger.info(
        "consensus map: %d particles, half-map FSC %.2f Å (0.143), %.2f Å (0.5), %.1f s",
        len(np.asarray(subsets)),
        stats["resolution_0143"],
        stats["resolution_05"],
        stats["seconds"],
    )
    return volume.astype(np.float32), stats


def consensus_reference(
    particles: str | Path,
    out_reference: str | Path,
    out_mask: str | Path,
    *,
    pixel_size: float | None = None,
    image_root: str | Path | None = None,
    radius_fraction: float = 0.4,
    iterations: int = 2,
    lowpass: float | None = None,
    seed: int = 0,
    backend: str = "auto",
    log: logging.Logger | None = None,
) -> dict[str, object]:
    """Write the consensus map of a particle set and the mask derived from it (both atomically).

    Parameters
    ----------
    particles
        RELION STAR or cryoSPARC ``.cs`` with poses and CTF.
    out_reference, out_mask
        MRC paths (the particles' box and pixel size).
    pixel_size, image_root
        overrides for :func:`z3lib.io.read_particles`.
    radius_fraction, iterations, lowpass, seed, backend
        see :func:`reconstruct_consensus`.
    log
        Logger for progress; default this module's.

    Returns
    -------
    ``{"reference": path, "mask": path, "resolution_0143": Å, "resolution_05": Å, "seconds": s}``.
    """
    from z3lib.io import read_particles, write_map

    logger = log or logging.getLogger(__name__)
    parts = read_particles(particles, pixel_size=pixel_size, image_root=image_root)
    parts.require_poses("a consensus map is reconstructed from the particles' poses")
    stack = parts.images()
    try:
        volume, stats = reconstruct_consensus(
            stack,
            parts.table,
            parts.table["random_subset"].to_numpy(),
            parts.box,
            parts.pixel_size,
            radius_fraction=radius_fraction,
            iterations=iterations,
            lowpass=lowpass,
            seed=seed,
            backend=backend,
            log=logger,
        )
    finally:
        stack.close()
    mask = mask_from_map(volume, parts.pixel_size)
    write_map(out_reference, volume, parts.pixel_size)
    write_map(out_mask, mask, parts.pixel_size)
    logger.info("consensus mask: %d voxels", int(mask.sum()))
    return {"reference": Path(out_reference), "mask": Path(out_mask), **stats}
