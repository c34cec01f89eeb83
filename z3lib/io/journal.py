"""Append-only journals of partial results: what a long per-particle loop has finished so far.

A journal is one file: a header (format line, then one JSON line with the fingerprint of the
work, the number of rows and the columns' dtypes and per-row shapes), then one record per
finished block of rows, appended as the work goes:

    8 bytes   payload length, little-endian unsigned
    32 bytes  SHA-256 of the payload
    payload   first row (int64 LE), row count (int64 LE), then each column's rows, C order

Each block is written once, so a run over ``n`` rows writes ``O(n)`` bytes in all (rewriting
whole arrays after every block writes ``O(n²)``: about 12 GB for 100,000 particles). A record
cut short by a kill, or damaged, fails its length or checksum and is dropped with everything
after it, and the file is truncated there: the rows it held are simply done again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from z3lib.io._common import PathLike, atomic_path

__all__ = ["Journal"]

MAGIC = b"z3-journal-1\n"
_HEAD = struct.Struct("<Q32s")
_SPAN = struct.Struct("<qq")


class Journal:
    """An open journal of results for rows ``0 … n − 1`` of fixed columns (see the module doc).

    Use :meth:`open`; then :meth:`append` after each finished block.
    """

    def __init__(self, path: Path, columns: dict[str, tuple[np.dtype, tuple[int, ...]]], n: int) -> None:
        self.path = path
        self.columns = columns
        self.n = n
        self.bytes_written = 0

    @classmethod
    def open(
        cls,
        path: PathLike,
        fingerprint: str,
        template: Mapping[str, np.ndarray],
        log: logging.Logger | None = None,
    ) -> tuple[Journal, np.ndarray]:
        """Open the journal at ``path`` for results shaped like ``template`` (arrays of ``n`` rows).

        When the file exists with the same ``fingerprint``, rows and columns, its intact records
        are copied into ``template`` (in place) and the returned ``(n,)`` mask flags their rows;
        otherwise (no file, other work, unreadable) a fresh journal replaces it, with a warning
        in the second case, and the mask is all False.
        """
        logger = log or logging.getLogger(__name__)
        n = len(next(iter(template.values())))
        columns = {k: (np.asarray(v).dtype, tuple(np.asarray(v).shape[1:])) for k, v in template.items()}
        journal = cls(Path(path), columns, n)
        done = np.zeros(n, dtype=bool)
        if journal.path.exists():
            header = journal._read_header()
            if header is not None and header == journal._header(fingerprint):
                done = journal._replay(template)
                if done.any():
                    logger.info("resuming: %d/%d rows already done (%s)", int(done.sum()), n, journal.path.name)
                return journal, done
            found = (header or {}).get("fingerprint", "(unreadable)")
            logger.warning(
                "%s holds partial results of other inputs, settings or library version "
                "(fingerprint %s…, now %s…): not used, starting afresh",
                journal.path,
                str(found)[:12],
                fingerprint[:12],
            )
        with atomic_path(journal.path) as tmp:
            tmp.write_bytes(MAGIC + json.dumps(journal._header(fingerprint), sort_keys=True).encode() + b"\n")
        return journal, done

    @classmethod
    def load(cls, path: PathLike) -> tuple[str, dict[str, np.ndarray], np.ndarray]:
        """Read a journal as it is: its fingerprint, its columns (zeros where no record) and the ``(n,)`` done mask.

        Intact records only (a torn tail is dropped and truncated, as when resuming).
        """
        journal = cls(Path(path), {}, 0)
        header = journal._read_header()
        if header is None:
            raise ValueError(f"{path} is not a z3 journal")
        rows = int(header["rows"])  # type: ignore[call-overload]
        specs = header["columns"]
        assert isinstance(specs, list)
        journal.n = rows
        journal.columns = {str(k): (np.dtype(d), tuple(int(x) for x in s)) for k, d, s in specs}
        arrays = {k: np.zeros((rows, *s), dtype=d) for k, (d, s) in journal.columns.items()}
        return str(header["fingerprint"]), arrays, journal._replay(arrays)

    def append(self, first: int, block: Mapping[str, np.ndarray]) -> None:
        """Append the results of rows ``first … first + m − 1`` (every column, ``m`` rows each)."""
        m = len(next(iter(block.values())))
        if first < 0 or first + m > self.n:
            raise ValueError(f"rows {first}…{first + m - 1} are outside 0…{self.n - 1} of {self.path}")
        parts = [_SPAN.pack(first, m)]
        for name, (dtype, shape) in self.columns.items():
            values = np.ascontiguousarray(block[name], dtype=dtype)
            if values.shape != (m, *shape):
                raise ValueError(f"column {name} of shape {values.shape}, expected {(m, *shape)}")
            parts.append(values.tobytes())
        payload = b"".join(parts)
        with open(self.path, "ab") as handle:
            handle.write(_HEAD.pack(len(payload), hashlib.sha256(payload).digest()) + payload)
            handle.flush()
        self.bytes_written += _HEAD.size + len(payload)

    # -- internals --------------------------------------------------------------------------
    def _header(self, fingerprint: str) -> dict[str, object]:
        return {
            "fingerprint": fingerprint,
            "rows": self.n,
            "columns": [[k, np.dtype(d).str, list(s)] for k, (d, s) in self.columns.items()],
        }

    def _read_header(self) -> dict[str, object] | None:
        with open(self.path, "rb") as handle:
            if handle.read(len(MAGIC)) != MAGIC:
                return None
            try:
                header = json.loads(handle.readline())
            except ValueError:
                return None
        return header if isinstance(header, dict) else None

    def _replay(self, out: Mapping[str, np.ndarray]) -> np.ndarray:
        """Copy the intact records into ``out``; truncate the file after the last one."""
        done = np.zeros(self.n, dtype=bool)
        widths = [
            (k, d, s, int(np.dtype(d).itemsize * np.prod(s, dtype=np.int64))) for k, (d, s) in self.columns.items()
        ]
        with open(self.path, "r+b") as handle:
            handle.read(len(MAGIC))
            handle.readline()
            good = handle.tell()
            while True:
                head = handle.read(_HEAD.size)
                if len(head) < _HEAD.size:
                    break
                length, digest = _HEAD.unpack(head)
                payload = handle.read(length)
                if len(payload) < length or hashlib.sha256(payload).digest() != digest or length < _SPAN.size:
                    break
                first, m = _SPAN.unpack_from(payload)
                if first < 0 or m < 0 or first + m > self.n or length != _SPAN.size + m * sum(w[3] for w in widths):
                    break
                offset = _SPAN.size
                for name, dtype, shape, width in widths:
                    chunk = np.frombuffer(
                        payload, dtype=dtype, count=m * int(np.prod(shape, dtype=np.int64)), offset=offset
                    )
                    out[name][first : first + m] = chunk.reshape((m, *shape))
                    offset += m * width
                done[first : first + m] = True
                good = handle.tell()
            handle.truncate(good)
        return done
