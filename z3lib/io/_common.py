"""What every file format of :mod:`z3lib.io` shares: the error type, atomic writes and small helpers.

Every writer of the package is atomic (:func:`atomic_path`): a temporary file in the destination
folder is renamed over the destination only when writing succeeded. Nothing in the package ever
unpickles a file (:func:`_refuse_pickle`, ``allow_pickle=False``).

Also here, because both particle readers (RELION STAR in :mod:`z3lib.io.particles`, cryoSPARC
``.cs`` in :mod:`z3lib.io.cryosparc`) and the modules below them use them: the canonical particle
table (:data:`TABLE_COLUMNS`, :func:`_make_table`) and :class:`ParticleSet`, the attributes of
:class:`z3lib.io.Particles` that image stacks and the STAR writer read.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import pandas as pd

from z3lib.zernike import count_terms

#: The one logger of the package (records keep the name ``z3lib.io`` whichever module logs).
logger = logging.getLogger("z3lib.io")

PathLike = str | os.PathLike[str]

_PICKLE_MESSAGE = "z3 never unpickles files; convert to STAR or .cs"


class Z3InputError(ValueError):
    """An input file is missing, unreadable or inconsistent; the message says what to fix."""


# ==============================================================================================
# Atomic writes
# ==============================================================================================
@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    The temporary file lives in the destination folder (so the final ``os.replace`` is an atomic
    rename on the same file system) and keeps the destination's suffix, so writers that look at
    the extension behave. If the body raises, the temporary file is removed and ``path`` is left
    as it was (absent, or the previous version). Missing parent folders are created.

    Parameters
    ----------
    path
        Final destination.

    Yields
    ------
    Path
        Where the body must write.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}.tmp{final.suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise Z3InputError(f"writer produced no file for {final} (temporary file {tmp})")
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def release_memory() -> None:
    """Hand freed heap memory back to the operating system.

    Parsing a large table frees most of what it allocated, but the allocators keep those pages:
    pyarrow's memory pool (the STAR reader's CSV parser) and glibc's heap (``malloc_trim``). On
    a 100,000-particle STAR that is about 70 MB of the 128 MB the read leaves resident. A no-op
    where neither applies.
    """
    import sys

    arrow = sys.modules.get("pyarrow")
    if arrow is not None:
        with contextlib.suppress(Exception):
            arrow.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """Return the C library's ``malloc_trim`` (glibc), or None (another C library)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    return None


def copy_file(source: PathLike, destination: PathLike) -> Path:
    """Copy a file's bytes to ``destination`` atomically (a temporary file renamed over it).

    A reader never sees a half-written copy; missing parent folders are created.
    """
    import shutil

    src = Path(source)
    _check_readable_file(src, "file")
    with atomic_path(destination) as tmp:
        shutil.copyfile(src, tmp)
    return Path(destination)


# ==============================================================================================
# NPZ archives, tab-separated tables, text and bytes
# ==============================================================================================
def write_npz(path: PathLike, **arrays: Any) -> None:
    """Write plain numeric arrays to an ``.npz`` file, atomically (never object arrays)."""
    clean = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in clean.items():
        if v.dtype == object:
            raise Z3InputError(f"write_npz({path}): array {k!r} has dtype object; only numeric arrays are written")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **clean)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool


def read_npz(path: PathLike) -> dict[str, npt.NDArray[Any]]:
    """Read every array of an ``.npz`` file (``allow_pickle=False``: object arrays are refused)."""
    p = Path(path)
    _check_readable_file(p, "NPZ archive")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as exc:
        raise Z3InputError(f"{p}: could not read the arrays ({exc}); z3 never unpickles files") from exc


def write_table(path: PathLike, table: pd.DataFrame) -> None:
    """Write a tab-separated table (header line, no index), atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.8g")


def read_table(path: PathLike) -> pd.DataFrame:
    """Read a tab-separated table written by :func:`write_table`."""
    p = Path(path)
    _check_readable_file(p, "table")
    return pd.read_csv(p, sep="\t")


def write_text(path: PathLike, text: str) -> None:
    """Write a UTF-8 text file (HTML, ChimeraX script, …), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write a binary file (an encoded figure, …), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ==============================================================================================
# Small helpers
# ==============================================================================================
def _check_readable_file(path: Path, what: str) -> None:
    if not path.exists():
        raise Z3InputError(
            f"{what} {path} does not exist; check the path (relative paths are "
            f"taken from the current folder {Path.cwd()})"
        )
    if path.is_dir():
        raise Z3InputError(f"{what} {path} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise Z3InputError(f"{what} {path} is not readable (permissions)")


def _looks_like_pickle(path: Path) -> bool:
    """Tell whether ``path`` has a ``.pkl``/``.pickle`` name or starts with a pickle protocol ≥ 2 header."""
    if path.suffix.lower() in (".pkl", ".pickle"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _refuse_pickle(path: Path) -> None:
    if _looks_like_pickle(path):
        raise Z3InputError(f"{path} is a Python pickle: {_PICKLE_MESSAGE}")


def _float32_to_decimal(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """float32 metadata to float64 through its shortest decimal (float32 2.95 → 2.95, not 2.9500000477).

    cryoSPARC stores typed-in quantities (pixel size, voltage, defocus) as float32; going through
    the shortest decimal that round-trips the float32 gives back the number the user typed.
    """
    arr = np.asarray(values)
    if arr.dtype != np.float32:
        return arr.astype(np.float64)
    uniq, inverse = np.unique(arr, return_inverse=True)
    dec = uniq.astype(str).astype(np.float64)
    return dec[inverse].reshape(arr.shape)


def _count_terms(l1: int, l2: int) -> int:
    """Zernike3D terms per axis: K = Σ_{h=0}^{L2} (2h+1)(⌊(L1−h)/2⌋+1) (0 for invalid degrees)."""
    if l1 < 0 or l2 < 0 or l2 > l1:
        return 0
    return count_terms(l1, l2)


def _format_float(value: float) -> str:
    """Shortest text that reads back as the same float64 (keeps ``1.0``, not ``1``)."""
    return repr(float(value))


# ==============================================================================================
# The canonical particle table
# ==============================================================================================
#: Canonical columns of :attr:`Particles.table`, in order.
TABLE_COLUMNS = (
    "image_index",
    "image_path",
    "image_name",
    "rot",
    "tilt",
    "psi",
    "shift_x",
    "shift_y",
    "defocus_u",
    "defocus_v",
    "defocus_angle",
    "voltage",
    "cs",
    "amplitude_contrast",
    "phase_shift",
    "bfactor",
    "ctf_scale",
    "pixel_size",
    "box",
    "optics_group",
    "random_subset",
    "phase_flipped",
    "ctf_premultiplied",
    "image_sign",
)


def _make_table(columns: dict[str, Any]) -> pd.DataFrame:
    table = pd.DataFrame({name: columns[name] for name in TABLE_COLUMNS})
    table["image_index"] = table["image_index"].astype(np.int64)
    table["box"] = table["box"].astype(np.int64)
    table["optics_group"] = table["optics_group"].astype(np.int64)
    table["random_subset"] = table["random_subset"].astype(np.int64)
    table["phase_flipped"] = table["phase_flipped"].astype(bool)
    table["ctf_premultiplied"] = table["ctf_premultiplied"].astype(bool)
    return table


def _missing_pixel_size_error(path: Path, rows: npt.NDArray[np.int64]) -> Z3InputError:
    return Z3InputError(
        f"{path}: no pixel size for {len(rows)} particle(s) (first: row {int(rows[0])}); looked "
        "for rlnImagePixelSize (optics block), rlnPixelSize, and rlnDetectorPixelSize with "
        "rlnMagnification. MRC headers of particle stacks are never used. Pass pixel_size= to "
        "read_particles (or set the pixel size in the config)"
    )


@runtime_checkable
class ParticleSet(Protocol):
    """The attributes of :class:`z3lib.io.Particles` that the modules below it read.

    :class:`z3lib.io.stack.ImageStack` and :func:`z3lib.io.relion.write_particles_star` take
    particles but cannot import :mod:`z3lib.io.particles` (which imports them); they are typed
    with, and :class:`~z3lib.io.stack.ImageStack` recognises particles by, this protocol. See
    :class:`z3lib.io.Particles` for what each attribute holds.
    """

    table: pd.DataFrame
    raw: pd.DataFrame
    optics: pd.DataFrame | None
    path: Path
    source_format: str
    relion_version: str | None
    block: str
    image_search: dict[str, list[str]]

    def __len__(self) -> int: ...
