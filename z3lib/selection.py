"""Choosing particles from the landscape and writing them for RELION and cryoSPARC.

A selection is a set of 0-based particle rows: the rows of ``report/landscape.tsv`` and of the
run's ``refine/particles.star`` (the input's order). It comes from a selection file (written by the
report's interactive ``landscape.html``, or by hand: one index per line, ``#`` comments), k-means
clusters (1-based, as in ``landscape.tsv``) or a range of one principal component's scores (px,
the ``pcN`` columns of ``landscape.tsv``). Criteria given together must all hold (intersection).

The chosen particles are written as a RELION STAR (every input column, the run's refined values
and coefficients, as in ``refine/particles.star``) and a cryoSPARC ``.cs`` (see
:func:`z3lib.io.write_cs`; when the run's input was a ``.cs``, its rows with every field).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from z3lib.io import (
    PathLike,
    Z3InputError,
    read_particles,
    read_star_blocks,
    read_table,
    write_cs,
    write_particles_star,
    write_text,
)
from z3lib.io.coefficients import ZERNIKE_BLOCK

IndexArray = npt.NDArray[np.int64]

#: The header line of a selection file (``landscape.html`` writes it; readers skip ``#`` lines).
SELECTION_HEADER = "# z3 selection: 0-based particle rows of report/landscape.tsv and refine/particles.star"


@dataclass(frozen=True)
class SelectionCriteria:
    """What to select (all given criteria must hold; at least one must be given).

    Attributes
    ----------
    file
        A selection file (:func:`read_selection_file`), or None.
    clusters
        k-means clusters, 1-based as in ``landscape.tsv``; empty: not a criterion.
    pc
        ``(component, low, high)``: the scores of PC ``component`` (1-based, px) in
        ``[low, high]``; None at either end leaves it open. None: not a criterion.
    """

    file: PathLike | None = None
    clusters: Sequence[int] = ()
    pc: tuple[int, float | None, float | None] | None = None

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> SelectionCriteria:
        """From the pipeline's ``select`` section (keys ``file``, ``clusters``, ``pc``)."""
        pc = section.get("pc")
        return cls(
            file=section.get("file"),
            clusters=tuple(int(c) for c in section.get("clusters") or ()),
            pc=None if pc is None else (int(pc[0]), _opt_float(pc[1]), _opt_float(pc[2])),
        )

    @property
    def empty(self) -> bool:
        """True when no criterion is given."""
        return self.file is None and not self.clusters and self.pc is None


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def read_selection_file(path: PathLike, n: int) -> IndexArray:
    """Read a selection file: 0-based particle rows, sorted and without repeats.

    Text (one integer per line; blank lines and lines starting with ``#`` are skipped; a
    tab-separated table with a ``particle`` column, like ``landscape.tsv``, works too) or a ``.npy``
    integer array.

    Parameters
    ----------
    path
        The file.
    n
        The run's number of particles; every row must be in ``0 … n − 1``.

    Raises
    ------
    Z3InputError
        The file is missing or unreadable, a line is not an integer (named by line number), or a
        row is out of range.
    """
    p = Path(path)
    if not p.is_file():
        raise Z3InputError(f"selection file not found: {p} (config key select.file)")
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise Z3InputError(f"{p}: a selection .npy must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        rows = arr.astype(np.int64)
    else:
        rows = _read_selection_text(p)
    bad = rows[(rows < 0) | (rows >= n)]
    if len(bad):
        raise Z3InputError(
            f"{p}: particle row {int(bad[0])} is outside 0…{n - 1} ({len(bad)} such row(s)); a selection "
            "file holds 0-based rows of this run's landscape.tsv: was it made for another run?"
        )
    return np.unique(rows)


def _read_selection_text(p: Path) -> IndexArray:
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    body = [(i + 1, s.strip()) for i, s in enumerate(lines) if s.strip() and not s.lstrip().startswith("#")]
    if body and "\t" in body[0][1] and "particle" in body[0][1].split("\t"):
        return np.asarray(read_table(p)["particle"].to_numpy(dtype=np.int64), dtype=np.int64)
    rows: list[int] = []
    for number, text in body:
        try:
            rows.append(int(text))
        except ValueError:
            raise Z3InputError(
                f"{p}, line {number}: {text[:40]!r} is not a particle row (one 0-based integer per line)"
            ) from None
    return np.asarray(rows, dtype=np.int64)


def select_rows(landscape: pd.DataFrame, criteria: SelectionCriteria, *, source: str = "landscape.tsv") -> IndexArray:
    """Return the sorted 0-based rows that meet every criterion.

    Parameters
    ----------
    landscape
        ``landscape.tsv`` as read: ``particle`` (0…n−1 in order), ``cluster`` (1…k), ``pc1`` ….
    criteria
        What to select.
    source
        The table's file, for messages.

    Raises
    ------
    Z3InputError
        No criterion, an unknown cluster or principal component, or an empty selection.
    """
    if criteria.empty:
        raise Z3InputError(
            "nothing to select: set select.file (a selection saved from report/landscape.html), "
            "select.clusters (e.g. [1, 3]) or select.pc (e.g. [1, -2.0, 0.5])"
        )
    n = len(landscape)
    keep = np.ones(n, dtype=bool)
    if criteria.file is not None:
        chosen = np.zeros(n, dtype=bool)
        chosen[read_selection_file(criteria.file, n)] = True
        keep &= chosen
    if criteria.clusters:
        labels = landscape["cluster"].to_numpy(dtype=np.int64)
        unknown = sorted(set(criteria.clusters) - set(labels.tolist()))
        if unknown:
            raise Z3InputError(
                f"select.clusters: cluster(s) {unknown} do not exist in {source} (clusters "
                f"{sorted(set(labels.tolist()))}, 1-based)"
            )
        keep &= np.isin(labels, list(criteria.clusters))
    if criteria.pc is not None:
        component, low, high = criteria.pc
        column = f"pc{component}"
        if column not in landscape.columns:
            have = [c for c in landscape.columns if c.startswith("pc")]
            raise Z3InputError(f"select.pc: {source} has no column {column} (it has {', '.join(have)})")
        scores = landscape[column].to_numpy(dtype=np.float64)
        keep &= (scores >= (-np.inf if low is None else low)) & (scores <= (np.inf if high is None else high))
    rows = np.flatnonzero(keep).astype(np.int64)
    if not len(rows):
        raise Z3InputError(f"the selection is empty: no particle of {source} meets every criterion ({criteria})")
    return rows


def write_selection(
    folder: PathLike,
    rows: IndexArray,
    *,
    particles: PathLike,
    source: PathLike | None = None,
    log: logging.Logger | None = None,
) -> dict[str, Path]:
    """Write the chosen particles as ``particles.star``, ``particles.cs`` and ``indices.txt``.

    Parameters
    ----------
    folder
        Where to write (``results/<run>/select/``).
    rows
        ``(m,)`` sorted 0-based rows of ``particles``.
    particles
        The run's ``refine/particles.star``: every input column, refined values, coefficients.
    source
        The run's input particle file; when it is a cryoSPARC ``.cs``, the ``.cs`` written holds its
        rows with every field (the run's refined poses and defoci written over the changed ones).
    log
        Where the counts go.

    Returns
    -------
    The files written, by kind (``star``, ``cs``, ``indices``).
    """
    out = Path(folder)
    parts = read_particles(particles)
    block = read_star_blocks(particles).get(ZERNIKE_BLOCK)  # a one-row table: L1, L2, Rmax, basis, box
    spec = None if block is None else {k: (v.item() if hasattr(v, "item") else v) for k, v in block.iloc[0].items()}
    table = parts.table.iloc[rows]
    files = {"star": out / "particles.star", "cs": out / "particles.cs", "indices": out / "indices.txt"}
    write_particles_star(files["star"], parts, table=table, zernike=spec)
    is_cs = source is not None and Path(source).suffix == ".cs"
    write_cs(files["cs"], table, source=source if is_cs else None, source_rows=rows if is_cs else None)
    write_text(files["indices"], SELECTION_HEADER + "\n" + "".join(f"{int(r)}\n" for r in rows))
    if log is not None:
        log.info("selected %d of %d particles: %s", len(rows), len(parts), ", ".join(str(p) for p in files.values()))
    return files
