"""Particle image stacks: lazy memory-mapped reading (:class:`ImageStack`) and the stack writers.

:class:`ImageStack` reads particle images spread over many MRC/MRCS stacks, a few stack files
memory-mapped at a time. :func:`_resolve_image_paths` finds the stacks that particle metadata
names (relative to ``image_root``, or to the metadata's folder and its parents, as RELION paths
are relative to the project folder) and :func:`_boxes_from_headers` reads their box from the MRC
headers. Pixel sizes never come from stack headers, only from the metadata. :func:`write_stack`
and :func:`open_stack_writer` write MRCS stacks atomically.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import mrcfile
import numpy as np
import numpy.typing as npt
import pandas as pd

from z3lib.io._common import ParticleSet, PathLike, Z3InputError, atomic_path
from z3lib.io.mrc import _voxel_tuple

_MAX_PARENT_LEVELS = 4
#: Bytes read through one stack's memory map after which its pages leave this process's
#: mappings (``madvise(MADV_DONTNEED)``): they stay in the page cache for the next read, but a
#: stack larger than memory never fills the process's resident set. Random reads map about 4×
#: what they read (the kernel maps the pages around each fault), so about 32 MB stay resident
#: (at 64 MB, a training epoch's peak grew 187 MB from 10,000 to 100,000 particles; at 4 MB it
#: did not grow).
RELEASE_BYTES = 8 << 20


def _release_pages(data: Any) -> None:
    """Drop the pages of a read-only memory-mapped array from this process's mappings (where supported)."""
    import mmap

    handle = getattr(data, "_mmap", None)
    if handle is None and getattr(data, "base", None) is not None:
        handle = getattr(data.base, "_mmap", None)
    if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            handle.madvise(mmap.MADV_DONTNEED)


# ==============================================================================================
# Finding the stacks
# ==============================================================================================
def _resolve_image_paths(
    meta_path: Path, rel_paths: Sequence[str], image_root: Path | None
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Map each distinct stack path of the metadata to an absolute path (+ the places tried)."""
    resolved: dict[str, str] = {}
    tried: dict[str, list[str]] = {}
    base = meta_path.parent.absolute()
    cwd = Path.cwd()
    for rel in rel_paths:
        if rel in resolved or rel == "":
            continue
        rp = Path(rel)
        if rp.is_absolute():
            candidates = [rp]
        elif image_root is not None:
            candidates = [image_root.absolute() / rp]
        else:
            candidates = [base / rp]
            parent = base
            for _ in range(_MAX_PARENT_LEVELS):
                if parent.parent == parent:
                    break
                parent = parent.parent
                candidates.append(parent / rp)
            candidates.append(cwd / rp)
        cand_str: list[str] = []
        for c in candidates:
            s = os.path.normpath(str(c))
            if s not in cand_str:
                cand_str.append(s)
        hit = next((c for c in cand_str if os.path.isfile(c)), None)
        resolved[rel] = hit if hit is not None else cand_str[0]
        tried[resolved[rel]] = cand_str
    return resolved, tried


def _boxes_from_headers(image_paths: Sequence[str]) -> npt.NDArray[np.int64]:
    """Box (nx) per particle from the MRC headers of the stacks that exist (0 where none)."""
    cache: dict[str, int] = {}
    out = np.zeros(len(image_paths), dtype=np.int64)
    for i, p in enumerate(image_paths):
        if p not in cache:
            box = 0
            if p and os.path.isfile(p):
                with contextlib.suppress(Exception), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with mrcfile.open(p, mode="r", permissive=True, header_only=True) as mrc:
                        box = int(mrc.header.nx)
            cache[p] = box
        out[i] = cache[p]
    return out


# ==============================================================================================
# Reading
# ==============================================================================================
class ImageStack:
    """Lazy, memory-mapped access to particle images spread over many MRC/MRCS stacks.

    Parameters
    ----------
    source
        A :class:`~z3lib.io.Particles` (anything with its attributes, :class:`ParticleSet`), or a
        sequence of stack paths (one per particle).
    indices
        0-based image index inside its stack, one per particle (only with a path sequence).
    names
        Text naming each particle in error messages (default ``"N@path"``).
    cache_size
        Number of stack files kept open (memory-mapped) at once; least recently used are closed.

    Notes
    -----
    ``stack[i]`` gives a float32 ``(box, box)`` image ``[y, x]``; ``stack[slice]`` and
    ``stack[int array]`` give float32 ``(n, box, box)`` in the requested order. Reads are
    grouped by file. Pixels are returned as stored (``image_sign`` of cryoSPARC input is not
    applied). Every read checks that the stack exists, that the index is inside it, that the
    image has the common box, and that all pixels are finite; errors name the particle row
    (0-based), its ``rlnImageName``, the file and the fix. The object pickles without its open
    files (for data-loader worker processes).
    """

    def __init__(
        self,
        source: ParticleSet | Sequence[PathLike],
        indices: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
        *,
        names: Sequence[str] | None = None,
        cache_size: int = 64,
    ) -> None:
        self._tried: dict[str, list[str]] = {}
        self._origin: str = ""
        expected_box: int | None = None
        if isinstance(source, ParticleSet):
            if indices is not None:
                raise TypeError("ImageStack(particles) takes no indices; they come from the table")
            table = source.table
            paths = table["image_path"].astype(str).tolist()
            idx = table["image_index"].to_numpy(dtype=np.int64)
            names_list = table["image_name"].astype(str).tolist()
            self._tried = dict(source.image_search)
            self._origin = f" (particles of {source.path})"
            boxes = np.unique(table["box"].to_numpy(dtype=np.int64))
            if len(boxes) == 1 and boxes[0] > 0:
                expected_box = int(boxes[0])
        else:
            if indices is None:
                raise TypeError("ImageStack(paths, indices): indices are required with paths")
            paths = [os.path.normpath(os.path.abspath(str(p))) for p in source]
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            if len(idx) != len(paths):
                raise Z3InputError(
                    f"ImageStack: {len(paths)} paths but {len(idx)} indices; give one of each per particle"
                )
            names_list = (
                list(names) if names is not None else [f"{i + 1}@{p}" for i, p in zip(idx.tolist(), paths, strict=True)]
            )
        if names is not None and isinstance(source, ParticleSet):
            names_list = list(names)
        if len(names_list) != len(paths):
            raise Z3InputError(f"ImageStack: {len(names_list)} names for {len(paths)} particles")
        empty = [i for i, p in enumerate(paths) if not p]
        if empty:
            raise Z3InputError(
                f"particle row {empty[0]}{self._origin} references no image (empty rlnImageName "
                f"or blob/path; {len(empty)} such rows): these particles cannot be read"
            )
        negative = np.flatnonzero(idx < 0)
        if len(negative):
            r = int(negative[0])
            raise Z3InputError(f"particle row {r} ({names_list[r]!r}){self._origin}: image index {idx[r]} < 0")
        self._files: list[str] = []
        file_id: dict[str, int] = {}
        ids = np.empty(len(paths), dtype=np.int64)
        for i, p in enumerate(paths):
            if p not in file_id:
                file_id[p] = len(self._files)
                self._files.append(p)
            ids[i] = file_id[p]
        self._file_ids = ids
        self._indices = idx
        self._names = names_list
        self._box = expected_box
        self._cache_size = max(1, int(cache_size))
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._mapped_bytes: dict[int, int] = {}  # read through each open map since its last release

    # -- basic protocol --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._indices)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        state["_mapped_bytes"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Close every open stack file."""
        while self._handles:
            _, handle = self._handles.popitem(last=False)
            with contextlib.suppress(Exception):
                handle.close()

    @property
    def files(self) -> list[str]:
        """Distinct stack files, in order of first use."""
        return list(self._files)

    @property
    def box(self) -> int:
        """Image box in pixels: ``rlnImageSize`` when known, else the header of particle 0's stack."""
        if self._box is None:
            if len(self) == 0:
                raise Z3InputError("ImageStack holds no particles: it has no box size")
            ny, nx, _ = self._header_shape(0, row=0)
            if ny != nx:
                raise self._error(0, f"its images are not square ({ny}×{nx} px); z3 needs square images")
            self._box = nx
        return self._box

    # -- errors ----------------------------------------------------------------------------
    def _error(self, row: int, what: str, fix: str = "") -> Z3InputError:
        f = self._files[self._file_ids[row]]
        text = f"particle row {row} (rlnImageName {self._names[row]!r}){self._origin}, file {f}: {what}"
        return Z3InputError(text + (f"; {fix}" if fix else ""))

    def _missing_error(self, row: int) -> Z3InputError:
        f = self._files[self._file_ids[row]]
        tried = self._tried.get(f, [f])
        return self._error(
            row,
            "the stack file does not exist (tried: " + ", ".join(tried) + ")",
            "set `image_root` (the pipeline's config key, or read_particles' argument) to the folder "
            "the image paths are relative to, usually the RELION or cryoSPARC project folder, or fix the paths",
        )

    # -- file access -----------------------------------------------------------------------
    def _header_shape(self, fid: int, *, row: int) -> tuple[int, int, int]:
        """(ny, nx, number of images) of a stack from its header, without reading pixels."""
        path = self._files[fid]
        if not os.path.isfile(path):
            raise self._missing_error(row)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                    h = mrc.header
                    return int(h.ny), int(h.nx), max(1, int(h.nz))
        except Exception as exc:
            raise self._error(
                row,
                f"cannot read the MRC header ({type(exc).__name__}: {exc})",
                "check that the file is an MRC/MRCS stack",
            ) from exc

    def _data(self, fid: int, *, row: int) -> npt.NDArray[Any]:
        handle = self._handles.get(fid)
        if handle is not None:
            self._handles.move_to_end(fid)
            return handle.data  # type: ignore[no-any-return]
        path = self._files[fid]
        if not os.path.isfile(path):
            raise self._missing_error(row)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                handle = mrcfile.mmap(path, mode="r", permissive=True)
        except Exception as exc:
            raise self._error(
                row,
                f"cannot open the stack ({type(exc).__name__}: {exc})",
                "check that the file is a complete MRC/MRCS stack",
            ) from exc
        data = handle.data
        if data is None or data.ndim not in (2, 3):
            handle.close()
            raise self._error(
                row,
                "the file holds no readable image data (truncated or not an MRC stack)",
                "re-extract or re-export the stack",
            )
        self._handles[fid] = handle
        if len(self._handles) > self._cache_size:
            _, old = self._handles.popitem(last=False)
            with contextlib.suppress(Exception):
                old.close()
        return data  # type: ignore[no-any-return]

    def _check_box(self, ny: int, nx: int, row: int) -> None:
        box = self.box
        if ny != nx or nx != box:
            raise self._error(
                row,
                f"mixed box sizes: its images are {ny}×{nx} px but the particles' box is {box} px",
                "z3 needs one box size; re-extract or rescale these particles",
            )

    # -- reading ---------------------------------------------------------------------------
    def _normalise_key(self, key: Any) -> tuple[npt.NDArray[np.int64], bool]:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            k = int(key)
            if k < -n or k >= n:
                raise IndexError(f"particle {k} out of range for {n} particles")
            return np.array([k % n], dtype=np.int64), True
        if isinstance(key, slice):
            return np.arange(n, dtype=np.int64)[key], False
        arr = np.asarray(key)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise IndexError(f"boolean mask of shape {arr.shape} for {n} particles")
            return np.flatnonzero(arr).astype(np.int64), False
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise IndexError("particles are indexed by an int, a slice or a 1-D array of ints")
        rows = arr.astype(np.int64)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"particle index out of range for {n} particles")
        return rows % n if n else rows, False

    def __getitem__(self, key: int | slice | npt.ArrayLike) -> npt.NDArray[np.float32]:
        rows, single = self._normalise_key(key)
        box = self.box if len(rows) else (self._box or 0)
        out = np.empty((len(rows), box, box), dtype=np.float32)
        if len(rows) == 0:
            return out
        fids = self._file_ids[rows]
        order = np.argsort(fids, kind="stable")
        sorted_fids = fids[order]
        starts = np.flatnonzero(np.r_[True, sorted_fids[1:] != sorted_fids[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends, strict=True):
            positions = order[s:e]  # positions in the output
            file_rows = rows[positions]
            fid = int(sorted_fids[s])
            data = self._data(fid, row=int(file_rows[0]))
            stack = data[None] if data.ndim == 2 else data
            count = stack.shape[0]
            self._check_box(int(stack.shape[1]), int(stack.shape[2]), int(file_rows[0]))
            idx = self._indices[file_rows]
            past = np.flatnonzero(idx >= count)
            if len(past):
                r = int(file_rows[past[0]])
                raise self._error(
                    r,
                    f"image index {int(self._indices[r]) + 1} (1-based) is past the end of the "
                    f"stack, which holds {count} image(s)",
                    "fix rlnImageName or point image_root= at the right stacks",
                )
            sort_idx = np.argsort(idx, kind="stable")
            block = np.asarray(stack[idx[sort_idx]], dtype=np.float32)
            out[positions[sort_idx]] = block
            self._mapped_bytes[fid] = self._mapped_bytes.get(fid, 0) + block.nbytes
            if self._mapped_bytes[fid] >= RELEASE_BYTES:
                _release_pages(data)
                self._mapped_bytes[fid] = 0
        finite = np.isfinite(out).reshape(len(rows), -1).all(axis=1)
        if not finite.all():
            r = int(rows[np.flatnonzero(~finite)[0]])
            raise self._error(
                r,
                "the image contains NaN or infinite pixels",
                "re-extract the particle or remove it from the STAR file",
            )
        return out[0] if single else out

    def validate(self) -> None:
        """Check every stack exists, every index is inside its stack and all boxes agree.

        Reads headers only (no pixel data). Raises one :class:`Z3InputError` listing the
        problems found (the first 10 in full).
        """
        problems: list[str] = []
        per_file = pd.DataFrame({"file": self._file_ids, "index": self._indices})
        groups = per_file.groupby("file", sort=True)
        heads = groups.head(1)
        first_row = np.empty(len(self._files), dtype=np.int64)  # file → its first particle row
        first_row[heads["file"].to_numpy()] = heads.index.to_numpy()
        largest = groups["index"].idxmax()
        max_row = np.empty(len(self._files), dtype=np.int64)  # file → row with the largest index
        max_row[largest.index.to_numpy()] = largest.to_numpy()
        max_idx = self._indices[max_row]
        try:
            box: int | None = self.box
        except Z3InputError as exc:
            problems.append(str(exc))
            box = None
        for fid in range(len(self._files)):
            row = int(first_row[fid])
            try:
                ny, nx, count = self._header_shape(fid, row=row)
            except Z3InputError as exc:
                problems.append(str(exc))
                continue
            if box is not None and (ny != nx or nx != box):
                problems.append(
                    str(
                        self._error(
                            row,
                            f"mixed box sizes: its images are {ny}×{nx} px but the particles' box is {box} px",
                            "z3 needs one box size; re-extract or rescale these particles",
                        )
                    )
                )
            if max_idx[fid] >= count:
                r = int(max_row[fid])
                problems.append(
                    str(
                        self._error(
                            r,
                            f"image index {int(max_idx[fid]) + 1} (1-based) is past the end of the "
                            f"stack, which holds {count} image(s)",
                            "fix rlnImageName or point image_root= at the right stacks",
                        )
                    )
                )
        if problems:
            more = f"\n… and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise Z3InputError(
                f"{len(problems)} problem(s) with the particle images:\n" + "\n".join(problems[:10]) + more
            )


# ==============================================================================================
# Writing
# ==============================================================================================
def write_stack(path: PathLike, stack: npt.ArrayLike, pixel_size: float) -> None:
    """Write an image stack as MRCS (float32 ``[n, y, x]``, image-stack header), atomically.

    Parameters
    ----------
    path
        Output ``.mrcs`` file.
    stack
        ``(n, y, x)`` images (a single ``(y, x)`` image is written as a stack of one).
    pixel_size
        Pixel size in Å.
    """
    arr = np.ascontiguousarray(np.asarray(stack), dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise Z3InputError(f"write_stack({path}): expected (n, y, x) images, got shape {arr.shape}")
    voxel = _voxel_tuple(pixel_size)
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(arr)
        mrc.set_image_stack()
        mrc.voxel_size = voxel


class StackWriter:
    """Chunk-by-chunk writer of an ``(n, box, box)`` float32 MRCS stack (see :func:`open_stack_writer`).

    ``writer[lo:hi] = images`` writes images ``lo … hi − 1`` with positioned writes, never
    through a memory map, so the process's resident memory holds one chunk whatever the stack's
    size; the header's minimum, maximum, mean and standard deviation accumulate as chunks come.
    """

    def __init__(self, path: Path, n: int, box: int, offset: int) -> None:
        self.path, self.n, self.box, self.offset = path, n, box, offset
        self._fd = os.open(path, os.O_WRONLY)
        self._written = 0
        self._min, self._max, self._sum, self._sumsq = np.inf, -np.inf, 0.0, 0.0

    def __setitem__(self, key: slice, images: npt.ArrayLike) -> None:
        """Write ``images`` ``(hi − lo, box, box)`` as stack entries ``key`` = ``lo:hi`` (step 1)."""
        lo, hi, step = key.indices(self.n) if isinstance(key, slice) else (None, None, None)
        if lo is None or step != 1:
            raise TypeError("a stack writer takes contiguous slices: writer[lo:hi] = images")
        arr = np.ascontiguousarray(np.broadcast_to(images, (hi - lo, self.box, self.box)), dtype="<f4")
        os.pwrite(self._fd, arr.tobytes(), self.offset + lo * self.box * self.box * 4)
        if arr.size:
            self._min, self._max = min(self._min, float(arr.min())), max(self._max, float(arr.max()))
            self._sum += float(arr.sum(dtype=np.float64))
            self._sumsq += float(np.square(arr, dtype=np.float64).sum())
            self._written += arr.size

    def close(self) -> dict[str, float]:
        """Close the file; return the header statistics of what was written."""
        os.close(self._fd)
        n = max(self._written, 1)
        mean = self._sum / n
        return {
            "dmin": self._min if self._written else 0.0,
            "dmax": self._max if self._written else 0.0,
            "dmean": mean,
            "rms": float(np.sqrt(max(self._sumsq / n - mean * mean, 0.0))),
        }


@contextlib.contextmanager
def open_stack_writer(path: PathLike, n: int, box: int, pixel_size: float) -> Iterator[StackWriter]:
    """Create an ``(n, box, box)`` float32 MRCS stack and yield a :class:`StackWriter` for it.

    The caller fills it chunk by chunk (``writer[lo:hi] = images``): nothing is held in memory
    beyond the chunk being written, not even through a memory map. The file appears at ``path``
    only when the block exits without an error (atomic rename); a failure leaves no partial
    stack behind.
    """
    if n < 1 or box < 1:
        raise Z3InputError(f"open_stack_writer({path}): need n >= 1 images of box >= 1, got {n}, {box}")
    with atomic_path(path) as tmp:
        # the header (image stack, pixel size) and a file of the full size, data unwritten
        with mrcfile.new_mmap(tmp, shape=(int(n), int(box), int(box)), mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = _voxel_tuple(pixel_size)
            offset = 1024 + int(mrc.header.nsymbt)
        writer = StackWriter(tmp, int(n), int(box), offset)
        try:
            yield writer
        finally:
            stats = writer.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.mmap(tmp, mode="r+") as mrc:  # maps the data, reads none of it
                for name, value in stats.items():
                    setattr(mrc.header, name, value)
