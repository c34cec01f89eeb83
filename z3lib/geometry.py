"""Rotations and point clouds.

Euler-angle conversions are defined in :mod:`z3lib.conventions` (the one place for conventions)
and exposed here as the public geometry API. Point clouds are ``(N, 3)`` arrays of ``(x, y, z)``
in pixels relative to the box centre ``N // 2``; volumes are ``[z, y, x]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from z3lib.conventions import box_center, euler_to_matrix, matrix_to_euler

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "points_from_mask",
    "points_from_volume",
    "random_rotations",
    "sphere_mask",
    "threshold_mask",
    "voxel_coordinates",
]


def voxel_coordinates(shape: tuple[int, int, int]) -> np.ndarray:
    """Centred ``(x, y, z)`` pixel coordinates of every voxel of a ``[z, y, x]`` volume.

    Returns
    -------
    ``shape + (3,)`` float64 array; the voxel at index ``(N//2, N//2, N//2)`` is at the origin.
    """
    nz, ny, nx = shape
    z, y, x = np.meshgrid(
        np.arange(nz) - box_center(nz),
        np.arange(ny) - box_center(ny),
        np.arange(nx) - box_center(nx),
        indexing="ij",
    )
    return np.stack([x, y, z], axis=-1).astype(np.float64)


def sphere_mask(box: int, radius: float | None = None) -> np.ndarray:
    """Boolean ``[z, y, x]`` ball of ``radius`` px (default ``box / 2``) around the centre."""
    r = 0.5 * box if radius is None else float(radius)
    coords = voxel_coordinates((box, box, box))
    return (coords**2).sum(-1) <= r * r  # type: ignore[no-any-return]


def threshold_mask(maps: list[np.ndarray], *, fraction: float = 0.05, dilate: int = 2) -> np.ndarray:
    """Return a binary ``[z, y, x]`` mask covering every map.

    Voxels above ``fraction`` of each map's maximum, united, dilated by ``dilate`` voxels, kept
    inside the ball of radius box/2 − 1.

    Returns float32 0/1.
    """
    from scipy.ndimage import binary_dilation

    union = np.zeros(maps[0].shape, dtype=bool)
    for m in maps:
        union |= m > fraction * float(m.max())
    if dilate > 0:
        union = binary_dilation(union, iterations=dilate)
    box = maps[0].shape[-1]
    out: np.ndarray = (union & sphere_mask(box, box / 2 - 1)).astype(np.float32)
    return out


def points_from_mask(mask: npt.ArrayLike, *, threshold: float = 0.5, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Point cloud of the voxels inside a mask.

    Parameters
    ----------
    mask
        ``(Z, Y, X)`` mask; voxels with value > ``threshold`` are kept.
    threshold
        Voxels with a value above it are inside.
    step
        keep voxels on a regular sub-grid of every ``step`` voxels per axis, aligned on the box
        centre (unlike Xmipp's every-s-th voxel of the flattened list, which is not a grid).

    Returns
    -------
    ``points`` ``(N, 3)`` float64 ``(x, y, z)`` px relative to the centre, and ``indices``
    ``(N, 3)`` int64 ``(z, y, x)`` voxel indices, in C order of the volume.
    """
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"a mask must be a 3D [z, y, x] array, got shape {m.shape}")
    keep = m > threshold
    if step > 1:
        grid = np.zeros_like(keep)
        cz, cy, cx = (box_center(n) % step for n in m.shape)
        grid[cz::step, cy::step, cx::step] = True
        keep &= grid
    idx = np.argwhere(keep)
    centre = np.array([box_center(n) for n in m.shape])
    points = (idx - centre)[:, ::-1].astype(np.float64)
    return points, idx.astype(np.int64)


def points_from_volume(
    volume: Any, *, mask: Any = None, threshold: float = 0.5, step: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Point cloud and amplitudes of a map: every voxel (or every voxel inside ``mask``).

    Returns
    -------
    ``points`` ``(N, 3)`` float64 px and ``amplitudes`` ``(N,)`` float64 map values there.
    When ``step > 1`` each point carries ``step³`` times its voxel value, so projections keep
    the map's mass.
    """
    vol = volume.detach().cpu().numpy() if hasattr(volume, "detach") else np.asarray(volume)
    if mask is None:
        m = np.ones(vol.shape, dtype=np.float32)
    else:
        m = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
        if m.shape != vol.shape:
            raise ValueError(f"mask shape {m.shape} differs from volume shape {vol.shape}")
    points, idx = points_from_mask(m.astype(np.float32), threshold=threshold, step=step)
    values = vol[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.float64) * float(step) ** 3
    return points, values


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, 3, 3)`` rotation matrices uniformly distributed on SO(3) (random unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=-2,
    )
