"""MRC maps: :func:`read_map` into ``[z, y, x]`` with voxel size and origin, :func:`write_map`.

Any axis order (``mapc``/``mapr``/``maps``), non-zero starts and extended headers are read;
invalid headers are read permissively with a logged warning. Maps are written float32 with axis
order 1, 2, 3, atomically. Particle stacks are in :mod:`z3lib.io.stack`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import numpy.typing as npt

from z3lib.io._common import PathLike, Z3InputError, _check_readable_file, atomic_path, logger


@dataclass
class MapData:
    """A 3-D map read from an MRC file.

    Attributes
    ----------
    data
        float32 ``[z, y, x]`` C-contiguous array (axis order of the file already undone).
    voxel_size
        ``(x, y, z)`` voxel size in Å (0 where the header has none).
    origin
        ``(x, y, z)`` position in Å of voxel ``[0, 0, 0]``: start indices
        (``nxstart``/``nystart``/``nzstart``, mapped to x, y, z) × voxel size + header origin.
    path
        The file read.
    """

    data: npt.NDArray[np.float32]
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]
    path: Path

    @property
    def pixel_size(self) -> float:
        """The isotropic voxel size in Å; ValueError if anisotropic or absent."""
        vx, vy, vz = self.voxel_size
        if not (vx > 0 and vy > 0 and vz > 0):
            raise Z3InputError(
                f"{self.path}: the MRC header has no voxel size ({vx}, {vy}, {vz} Å); set the "
                "pixel size in the config or fix the header (e.g. relion_image_handler --angpix)"
            )
        if not (math.isclose(vx, vy, rel_tol=1e-4) and math.isclose(vx, vz, rel_tol=1e-4)):
            raise Z3InputError(
                f"{self.path}: anisotropic voxels (x, y, z) = ({vx:g}, {vy:g}, {vz:g}) Å; z3 needs "
                "cubic voxels: resample the map (e.g. ChimeraX 'volume resample' or "
                "relion_image_handler --rescale_angpix)"
            )
        return float(vx)


def read_map(path: PathLike, *, require_isotropic: bool = False) -> MapData:
    """Read an MRC map into ``[z, y, x]`` order with its voxel size and origin.

    Parameters
    ----------
    path
        MRC/MAP file. Extended headers, symmetry records, non-zero starts and any axis order
        (``mapc``/``mapr``/``maps``) are handled; invalid headers are read permissively with a
        logged warning.
    require_isotropic
        Raise when the voxels are not cubic (or the header has no voxel size).

    Returns
    -------
    MapData
    """
    p = Path(path)
    _check_readable_file(p, "map file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.open(p, mode="r", permissive=True) as mrc:
                header = mrc.header
                raw = mrc.data
                if raw is None:
                    raise Z3InputError(f"{p}: no readable data in the MRC file (truncated, or not an MRC file)")
                voxel = mrc.voxel_size
                vsize = (float(voxel.x), float(voxel.y), float(voxel.z))
                head_origin = (float(header.origin.x), float(header.origin.y), float(header.origin.z))
                starts = (int(header.nxstart), int(header.nystart), int(header.nzstart))
                axes = (int(header.mapc), int(header.mapr), int(header.maps))
                data = np.asarray(raw)
                if data.ndim == 2:
                    data = data[None]
                if data.ndim != 3:
                    raise Z3InputError(f"{p}: expected a 3-D map, the MRC data has shape {data.shape}")
                # columns ↔ mapc, rows ↔ mapr, sections ↔ maps (1 = x, 2 = y, 3 = z)
                if sorted(axes) != [1, 2, 3]:
                    logger.warning("%s: invalid axis order mapc/mapr/maps = %s; assuming 1, 2, 3", p, axes)
                    axes = (1, 2, 3)
                labels = [axes[2], axes[1], axes[0]]  # label of data axis 0 (sections), 1, 2
                order = [labels.index(3), labels.index(2), labels.index(1)]
                data = np.ascontiguousarray(np.transpose(data, order), dtype=np.float32)
        except Z3InputError:
            raise
        except Exception as exc:
            raise Z3InputError(f"could not read {p} as an MRC map ({type(exc).__name__}: {exc})") from exc
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if messages:
        logger.warning("%s: the MRC header is not valid (%s); read it anyway", p, "; ".join(messages))
    # start values are given per column/row/section: map them to x, y, z
    start_xyz = [0, 0, 0]
    start_xyz[axes[0] - 1] = starts[0]
    start_xyz[axes[1] - 1] = starts[1]
    start_xyz[axes[2] - 1] = starts[2]
    origin = tuple(start_xyz[i] * vsize[i] + head_origin[i] for i in range(3))
    result = MapData(data=data, voxel_size=vsize, origin=(origin[0], origin[1], origin[2]), path=p)
    if require_isotropic:
        _ = result.pixel_size
    return result


def _voxel_tuple(pixel_size: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(pixel_size, (int, float, np.floating, np.integer)):
        v = float(pixel_size)
        vs = (v, v, v)
    else:
        seq = [float(x) for x in pixel_size]
        if len(seq) != 3:
            raise Z3InputError(f"voxel size must be a number or (x, y, z), got {pixel_size!r}")
        vs = (seq[0], seq[1], seq[2])
    if not all(math.isfinite(x) and x > 0 for x in vs):
        raise Z3InputError(f"voxel size must be positive, got {pixel_size!r}")
    return vs


def write_map(
    path: PathLike,
    data: npt.ArrayLike,
    pixel_size: float | Sequence[float],
    *,
    origin: Sequence[float] | None = None,
) -> None:
    """Write a 3-D map as MRC (float32, axis order 1,2,3), atomically.

    Parameters
    ----------
    path
        Output file.
    data
        ``[z, y, x]`` volume.
    pixel_size
        Voxel size in Å (a number, or ``(x, y, z)``).
    origin
        Header origin ``(x, y, z)`` in Å (default 0).
    """
    vol = np.ascontiguousarray(np.asarray(data), dtype=np.float32)
    if vol.ndim != 3:
        raise Z3InputError(f"write_map({path}): expected a [z, y, x] volume, got shape {vol.shape}")
    voxel = _voxel_tuple(pixel_size)
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(vol)
        mrc.voxel_size = voxel
        if origin is not None:
            ox, oy, oz = (float(v) for v in origin)
            mrc.header.origin = (ox, oy, oz)
