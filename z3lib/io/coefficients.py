"""Read and write Zernike3D coefficient files: ``.npy``, STAR ``zernikeCoefficients``, ``z_clnm``.

``.npy`` arrays, the Flexutils ``zernikeCoefficients`` STAR column and Xmipp/Flexutils
``z_clnm`` text files.

Coefficient vectors are ``3K`` long, laid out ``[c_x(K), c_y(K), c_z(K)]``, in pixels of the box
that ``Rmax`` refers to (:mod:`z3lib.zernike`, which re-exports the column and text-file helpers).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from z3lib.io._common import (
    _PICKLE_MESSAGE,
    PathLike,
    Z3InputError,
    _check_readable_file,
    _count_terms,
    _format_float,
    _refuse_pickle,
    atomic_path,
    logger,
)
from z3lib.zernike import ZernikeSpec

ZERNIKE_COLUMN = "zernikeCoefficients"
#: Rows of coefficients read at once when a whole file is streamed (:meth:`FieldRows.blocks`).
ROW_BLOCK = 4096
#: Name of the single-row STAR block describing the Zernike3D basis of ``ZERNIKE_COLUMN``.
ZERNIKE_BLOCK = "zernike3d"


def write_coefficients(path: PathLike, coefficients: npt.ArrayLike) -> None:
    """Save an ``(n, 3K)`` coefficient array as ``.npy`` (float32 or float64 kept), atomically."""
    arr = np.asarray(coefficients)
    if arr.ndim != 2:
        raise Z3InputError(f"write_coefficients({path}): expected (n, 3K), got shape {arr.shape}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def read_coefficients(path: PathLike, rows: slice | npt.ArrayLike | None = None) -> npt.NDArray[np.floating[Any]]:
    """Load an ``(n, 3K)`` coefficient array from ``.npy`` (never unpickling).

    ``rows`` (a slice or row indices) reads only those rows, ``(len(rows), 3K)``, with positioned
    reads of each run of consecutive rows: nothing is mapped, so a process holds only what it asked
    for (a mapping would fault in the pages around every scattered row, up to the whole file).
    """
    p = Path(path)
    _check_readable_file(p, "coefficient file")
    _refuse_pickle(p)
    try:
        arr = np.load(p, allow_pickle=False) if rows is None else _read_rows(p, rows)
    except IndexError as exc:
        raise Z3InputError(f"{p}: rows out of range ({exc})") from exc
    except ValueError as exc:
        raise Z3InputError(f"{p}: could not load the coefficients ({exc}); {_PICKLE_MESSAGE}") from exc
    except Exception as exc:
        raise Z3InputError(f"{p}: not a .npy coefficient file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise Z3InputError(
            f"{p}: expected a 2-D (particles × 3K) numeric array, got "
            f"{getattr(arr, 'shape', None)} {getattr(arr, 'dtype', type(arr))}"
        )
    return arr if arr.dtype.kind == "f" else arr.astype(np.float64)


def _npy_header(fh: Any) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """Shape, Fortran order and dtype from an open ``.npy`` file's header; ``fh`` is left at the data."""
    major, _ = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fh)
    return tuple(shape), bool(fortran), np.dtype(dtype)


def _read_rows(path: Path, rows: slice | npt.ArrayLike) -> npt.NDArray[Any]:
    """Rows ``rows`` of a C-ordered 2-D ``.npy`` (numpy's indexing: negatives count from the end)."""
    with open(path, "rb") as fh:
        shape, fortran, dtype = _npy_header(fh)
        offset = fh.tell()
        if len(shape) != 2:
            raise ValueError(f"shape {shape}")
        n, width = int(shape[0]), int(shape[1])
        index = np.arange(n)[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64).ravel()
        if len(index) and (index.min() < -n or index.max() >= n):
            raise IndexError(f"index {int(index.max() if index.max() >= n else index.min())} for {n} rows")
        index = np.where(index < 0, index + n, index)
        if fortran:  # not what z3 writes: the plain way
            return np.array(np.load(path, mmap_mode="r", allow_pickle=False)[index])
        row_bytes = width * dtype.itemsize
        out = np.empty((len(index), width), dtype=dtype)
        if not len(index):
            return out
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        starts = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)  # each run of consecutive rows
        for a, b in zip(starts, np.append(starts[1:], len(ordered)), strict=True):
            data = os.pread(fh.fileno(), int(b - a) * row_bytes, offset + int(ordered[a]) * row_bytes)
            out[order[a:b]] = np.frombuffer(data, dtype=dtype).reshape(int(b - a), width)
    return out


def coefficient_file_shape(path: PathLike) -> tuple[int, int]:
    """Return the ``(n, 3K)`` shape of a ``.npy`` coefficient file from its header (no data read)."""
    p = Path(path)
    _check_readable_file(p, "coefficient file")
    _refuse_pickle(p)
    with open(p, "rb") as fh:
        try:
            shape, _, dtype = _npy_header(fh)
        except ValueError as exc:
            raise Z3InputError(f"{p}: not a .npy coefficient file ({exc})") from exc
    if len(shape) != 2 or np.dtype(dtype).kind not in "fiu":
        raise Z3InputError(f"{p}: expected a 2-D (particles × 3K) numeric array, got {shape} {dtype}")
    return int(shape[0]), int(shape[1])


class CoefficientFile:
    """An ``(n, 3K)`` ``.npy`` coefficient file read a block of rows at a time.

    Slicing (``file[lo:hi]``, or row indices) returns the rows (float32 or float64, as stored) read by
    :func:`read_coefficients`; nothing stays mapped between reads. It stands where an array of
    coefficients would be written as a STAR column (:func:`z3lib.io.write_particles_star` formats
    it one block of rows at a time).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.shape = coefficient_file_shape(self.path)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | npt.ArrayLike) -> npt.NDArray[np.floating[Any]]:
        return read_coefficients(self.path, rows)


class CoefficientWriter:
    """Rows of an ``(n, 3K)`` float64 ``.npy`` written as they come (positioned writes, no mapping).

    Made by :func:`open_coefficient_writer`; ``writer[rows] = values`` with ``rows`` a slice
    or row indices.
    """

    def __init__(self, fd: int, n: int, width: int, offset: int) -> None:
        self._fd, self.shape, self._offset = fd, (n, width), offset
        self._row_bytes = width * 8

    def __setitem__(self, rows: slice | npt.ArrayLike, values: npt.ArrayLike) -> None:
        n, width = self.shape
        arr = np.ascontiguousarray(values, dtype="<f8")
        if isinstance(rows, slice):
            lo, hi, step = rows.indices(n)
            if step != 1:
                raise ValueError("CoefficientWriter: slices must be contiguous")
            if arr.shape != (hi - lo, width):
                raise ValueError(f"CoefficientWriter: {arr.shape} values for rows {lo}:{hi} of width {width}")
            os.pwrite(self._fd, arr.tobytes(), self._offset + lo * self._row_bytes)
            return
        index = np.asarray(rows, dtype=np.int64).ravel()
        if arr.shape != (len(index), width) or (len(index) and (index.min() < 0 or index.max() >= n)):
            raise ValueError(f"CoefficientWriter: {arr.shape} values for {len(index)} rows of ({n}, {width})")
        if len(index) and np.all(np.diff(index) == 1):  # consecutive rows: one write
            self[int(index[0]) : int(index[-1]) + 1] = arr
            return
        for i, row in zip(index.tolist(), arr, strict=True):
            os.pwrite(self._fd, row.tobytes(), self._offset + i * self._row_bytes)


class FieldRows:
    """Particles' fields ``s · (M c_i − f_h(i))`` ``(n, 3K)`` px, made a batch of rows at a time.

    ``c_i`` are read from ``source`` (an array, or a :class:`~z3lib.io.coefficients.CoefficientFile`
    read from disk), ``M`` is ``convert`` (e.g. px of the original box → px of the processing box),
    ``f_h`` the frame field ``(3K,)`` of particle ``i``'s half set (rows in no half keep theirs)
    and ``s`` the field scale. ZART and the field-scale search take rows with ``rows[index]``
    (float32 when ``dtype`` says so); the whole ``(n, 3K)`` array never exists, so the memory a
    reconstruction needs does not grow with the number of particles (:func:`row_blocks` streams
    all of them).
    """

    def __init__(
        self,
        source: Any,
        convert: Any = None,
        *,
        halves: Sequence[np.ndarray] = (),
        frames: Sequence[np.ndarray] = (),
        scale: float = 1.0,
        dtype: Any = np.float64,
    ) -> None:
        self.source, self.convert, self.scale, self.dtype = source, convert, float(scale), np.dtype(dtype)
        n, width = int(source.shape[0]), int(source.shape[1])
        self.shape = (n, width)
        self._half = np.full(n, -1, dtype=np.int64)
        for h, rows in enumerate(halves):
            self._half[np.asarray(rows, dtype=np.int64)] = h
        self._frames = np.vstack([np.asarray(f, np.float64) for f in frames] + [np.zeros(width)])  # row −1: none

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        index = np.arange(*rows.indices(self.shape[0])) if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        c = np.asarray(self.source[index], dtype=np.float64)
        if self.convert is not None:
            c = self.convert(c)
        out: np.ndarray = ((c - self._frames[self._half[index]]) * self.scale).astype(self.dtype, copy=False)
        return out

    def scaled(self, scale: float, dtype: Any = None) -> FieldRows:
        """Return the same fields times ``scale`` (and cast to ``dtype``)."""
        other = copy.copy(self)
        other.scale, other.dtype = self.scale * float(scale), np.dtype(dtype or self.dtype)
        return other


def row_blocks(coefficients: Any) -> Iterator[np.ndarray]:
    """Yield every row of ``(n, 3K)`` coefficients in order, :data:`ROW_BLOCK` rows at a time.

    ``coefficients``: an array, a :class:`CoefficientFile` or a :class:`FieldRows` (each block read
    from disk as it is needed).
    """
    for lo in range(0, len(coefficients), ROW_BLOCK):
        yield np.asarray(coefficients[lo : lo + ROW_BLOCK])


@contextlib.contextmanager
def open_coefficient_writer(path: PathLike, n: int, width: int) -> Iterator[CoefficientWriter]:
    """Write an ``(n, width)`` float64 coefficient ``.npy`` row block by row block, atomically.

    The file appears at ``path`` only when the body ends without error, like
    :func:`write_coefficients`; rows never written read as zeros.
    """
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (int(n), int(width))}
    )
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, header.getvalue())
            os.ftruncate(fd, len(header.getvalue()) + int(n) * int(width) * 8)
            yield CoefficientWriter(fd, int(n), int(width), len(header.getvalue()))
        finally:
            os.close(fd)


def format_coefficient_column(coefficients: npt.ArrayLike, *, digits: int | None = None) -> list[str]:
    """Format ``(n, 3K)`` coefficients as Flexutils ``zernikeCoefficients`` strings.

    Parameters
    ----------
    coefficients
        ``(n, 3K)`` (or ``(3K,)`` for one particle), layout ``[c_x(K), c_y(K), c_z(K)]``.
    digits
        Significant digits; default 9 for float32 and 17 for float64 input (exact round trip).

    Returns
    -------
    list of str
        One comma-separated string per particle (no spaces, so no quoting in STAR).
    """
    arr = np.asarray(coefficients)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise Z3InputError(f"format_coefficient_column: expected (n, 3K), got shape {arr.shape}")
    if digits is None:
        digits = 9 if arr.dtype == np.float32 else 17
    fmt = ",".join([f"%.{digits}g"] * arr.shape[1])
    return [fmt % tuple(row.tolist()) for row in arr.astype(np.float64, copy=False)]  # row by row: no n×3K list


def parse_coefficient_column(values: Iterable[Any], *, n_expected: int | None = None) -> npt.NDArray[np.float64]:
    """Parse a ``zernikeCoefficients`` (or Xmipp ``sphCoefficients``) column.

    Parameters
    ----------
    values
        One entry per particle: comma- or whitespace-separated numbers, optionally quoted.
    n_expected
        Expected count (3K). Entries with 3K + 8 numbers (the older Xmipp program) lose their
        trailing 8 with a logged warning.

    Returns
    -------
    ``(n, 3K)`` float64 array.
    """
    rows: list[list[float]] = []
    stripped = 0
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            raise Z3InputError(f"coefficient column: row {i} is empty")
        text = str(value).strip().strip("'\"").strip().strip("[]")
        parts = [t for t in re.split(r"[,\s]+", text) if t]
        try:
            numbers = [float(t) for t in parts]
        except ValueError as exc:
            raise Z3InputError(f"coefficient column: row {i} holds a non-number ({exc})") from exc
        if n_expected is not None and len(numbers) == n_expected + 8:
            numbers = numbers[:n_expected]
            stripped += 1
        if n_expected is not None and len(numbers) != n_expected:
            raise Z3InputError(
                f"coefficient column: row {i} has {len(numbers)} numbers, expected {n_expected} "
                "(3K for the file's Zernike degrees)"
            )
        if rows and len(numbers) != len(rows[0]):
            raise Z3InputError(f"coefficient column: row {i} has {len(numbers)} numbers but row 0 has {len(rows[0])}")
        if not numbers:
            raise Z3InputError(f"coefficient column: row {i} is empty")
        rows.append(numbers)
    if stripped:
        logger.warning(
            "coefficient column: dropped the trailing 8 numbers of %d row(s) (old Xmipp 3K+8 layout)", stripped
        )
    if not rows:
        return np.zeros((0, n_expected or 0))
    return np.asarray(rows, dtype=np.float64)


def write_zernike_file(path: PathLike, coefficients: npt.ArrayLike, L1: int, L2: int, rmax: float) -> None:
    """Write a Xmipp/Flexutils Zernike coefficient text file (``z_clnm.txt`` style), atomically.

    Line 1 is ``L1 L2 Rmax``; every following line is one space-separated ``3K`` vector
    ``[c_x, c_y, c_z]`` in pixels of the box that ``Rmax`` refers to.

    Parameters
    ----------
    path
        Destination text file.
    coefficients
        ``(n, 3K)`` or ``(3K,)``.
    L1, L2
        Zernike degrees; ``3K`` must match them.
    rmax
        Radius (px) of the unit ball.
    """
    arr = np.asarray(coefficients, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    k = _count_terms(int(L1), int(L2))
    if k == 0:
        raise Z3InputError(f"write_zernike_file({path}): invalid degrees L1={L1}, L2={L2}")
    if arr.ndim != 2 or arr.shape[1] != 3 * k:
        raise Z3InputError(
            f"write_zernike_file({path}): coefficients of shape {arr.shape} but (L1, L2) = "
            f"({L1}, {L2}) needs 3K = {3 * k} per vector"
        )
    lines = [f"{int(L1)} {int(L2)} {_format_float(rmax)}"]
    lines += [" ".join(repr(v) for v in row) for row in arr.tolist()]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def read_zernike_file(path: PathLike) -> tuple[npt.NDArray[np.float64], int, int, float]:
    """Read a Xmipp/Flexutils Zernike coefficient text file.

    Returns
    -------
    coefficients
        ``(n, 3K)`` float64 (``n`` may be 0).
    L1, L2
        Degrees from line 1.
    rmax
        ``Rmax`` from line 1 (px).
    """
    p = Path(path)
    _check_readable_file(p, "Zernike coefficient file")
    _refuse_pickle(p)
    try:
        lines = [ln.strip() for ln in p.read_text().splitlines()]
    except UnicodeDecodeError as exc:
        raise Z3InputError(f"{p}: not a text file ({exc})") from exc
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise Z3InputError(f"{p}: empty; expected 'L1 L2 Rmax' on line 1")
    head = lines[0].split()
    try:
        l1, l2, rmax = int(float(head[0])), int(float(head[1])), float(head[2])
    except (IndexError, ValueError) as exc:
        raise Z3InputError(f"{p}: line 1 is {lines[0]!r}; expected 'L1 L2 Rmax'") from exc
    k = _count_terms(l1, l2)
    if k == 0:
        raise Z3InputError(f"{p}: invalid degrees L1={l1}, L2={l2} on line 1")
    rows: list[list[float]] = []
    stripped = 0
    for number, line in enumerate(lines[1:], start=2):
        try:
            values = [float(t) for t in line.replace(",", " ").split()]
        except ValueError as exc:
            raise Z3InputError(f"{p}: line {number} holds a non-number ({exc})") from exc
        if len(values) == 3 * k + 8:
            values = values[: 3 * k]
            stripped += 1
        if len(values) != 3 * k:
            raise Z3InputError(
                f"{p}: line {number} has {len(values)} numbers; (L1, L2) = ({l1}, {l2}) needs 3K = {3 * k}"
            )
        rows.append(values)
    if stripped:
        logger.warning("%s: dropped the trailing 8 numbers of %d line(s) (old Xmipp 3K+8 layout)", p, stripped)
    coeffs = np.asarray(rows, dtype=np.float64).reshape(len(rows), 3 * k)
    return coeffs, l1, l2, rmax


def _validate_zernike(zernike: ZernikeSpec | Mapping[str, Any]) -> dict[str, Any]:
    """Check the ``zernike=`` basis of the STAR and Xmipp writers and return its block.

    A :class:`~z3lib.zernike.ZernikeSpec`, or a mapping with ``L1``, ``L2`` (valid degrees), ``Rmax``
    (``box / 2``), ``basis`` and ``box``; a mapping's extra keys are kept.
    """
    if isinstance(zernike, ZernikeSpec):
        return zernike.to_block()
    try:
        out = ZernikeSpec.from_block(zernike).to_block()
    except ValueError as exc:
        raise Z3InputError(f"write_particles_star: zernike= {exc}") from exc
    for key, value in zernike.items():
        if key not in out:
            out[str(key)] = value
    return out
