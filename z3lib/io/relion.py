"""RELION STAR files: reading their data blocks, and writing STAR (particle STAR and any blocks).

Reading here is block-level (:func:`read_star_blocks`); :func:`z3lib.io.read_particles` turns a
particle STAR into :class:`z3lib.io.Particles`. Both writers go through :func:`write_star`: floats
in their shortest exact form, a ``# version`` line before the ``optics`` and ``particles`` blocks
as RELION ≥ 3.1 writes, atomically. :func:`write_particles_star` keeps every input column and
writes changed per-particle values of the canonical table back into the RELION columns
(shifts in Å for RELION ≥ 3.1 and ``.cs`` input, in px for RELION 3.0 input).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import starfile

from z3lib.io._common import (
    ParticleSet,
    PathLike,
    Z3InputError,
    _check_readable_file,
    _format_float,
    _refuse_pickle,
    atomic_path,
)
from z3lib.io.coefficients import ZERNIKE_BLOCK, _validate_zernike, format_coefficient_column
from z3lib.zernike import ZernikeSpec

_DEFAULT_RELION_VERSION = "30001"


# ==============================================================================================
# STAR blocks
# ==============================================================================================
def _read_star_raw(path: Path) -> dict[str, Any]:
    _check_readable_file(path, "STAR file")
    _refuse_pickle(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises many kinds of errors on malformed text
        raise Z3InputError(
            f"could not parse {path} as a STAR file ({type(exc).__name__}: {exc}); "
            "check that it is a RELION STAR file (text with data_ blocks)"
        ) from exc
    if not isinstance(blocks, dict) or not blocks:
        raise Z3InputError(f"{path} holds no STAR data blocks; check that it is a RELION STAR file")
    return dict(blocks)


def read_star_blocks(path: PathLike) -> dict[str, pd.DataFrame]:
    """Every data block of a STAR file, as DataFrames.

    Parameters
    ----------
    path
        STAR file.

    Returns
    -------
    dict
        Block name (without ``data_``; ``""`` for an unnamed block) → DataFrame. Loop blocks keep
        their rows; single-value (non-loop) blocks become one-row DataFrames.
    """
    raw = _read_star_raw(Path(path))
    out: dict[str, pd.DataFrame] = {}
    for name, block in raw.items():
        if isinstance(block, pd.DataFrame):
            out[name] = block
        else:
            out[name] = pd.DataFrame({k: [v] for k, v in dict(block).items()})
    return out


def _read_relion_version(path: Path) -> str | None:
    """Return the ``# version`` number of a STAR file (e.g. ``"30001"``) from its first 8 KiB, or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(8192)
    except OSError:
        return None
    match = re.search(r"^#\s*version\s+(\d+)", head, flags=re.MULTILINE)
    return match.group(1) if match else None


# ==============================================================================================
# STAR writing
# ==============================================================================================
def write_star(
    path: PathLike,
    blocks: Mapping[str, pd.DataFrame | Mapping[str, Any]],
    *,
    relion_version: str | None = _DEFAULT_RELION_VERSION,
    wide: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write STAR blocks (``name → DataFrame`` loops or ``name → dict`` single values), atomically.

    ``wide[block][column]``: an ``(n, 3K)`` coefficient source (an array, or a
    :class:`~z3lib.io.coefficients.CoefficientFile`) formatted into that block's column (which
    must exist; its values are ignored) a few hundred rows at a time as the file is written.

    Floats are written in their shortest exact form. With ``relion_version``, a
    ``# version`` line precedes the ``optics`` and ``particles`` blocks, as RELION ≥ 3.1 writes.
    :func:`write_particles_star` writes its text through this function too.
    """
    writer = starfile.writer.StarWriter(dict(blocks), float_format=_format_float)
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        for line in _star_lines(writer, relion_version, wide or {}):
            handle.write(line + "\n")


#: Rows of a loop block formatted at once (the file is written as it is formatted, so a
#: 100,000-particle STAR never exists as one string in memory).
_STAR_CHUNK_ROWS = 4096
#: The same for a block with coefficient columns (3K numbers of up to 24 characters per row).
_WIDE_CHUNK_ROWS = 128


def _star_lines(writer: Any, relion_version: str | None, wide: Mapping[str, Mapping[str, Any]]) -> Iterator[str]:
    """Yield the lines of the STAR file of ``writer`` (a ``starfile`` StarWriter), loops in chunks of rows.

    The lines are starfile's own (its header, blocks and row formatting), with z3lib named in the
    first line and, with ``relion_version``, a ``# version`` line before the optics and particle
    blocks. ``wide[block][column]`` (a 2-D array, or anything sliced by rows into one, such as
    :class:`~z3lib.io.coefficients.CoefficientFile`) fills that column chunk by chunk with
    :func:`format_coefficient_column` strings.
    """
    from starfile.writer import loop_block, package_info, simple_block

    yield package_info().replace("# Created by the starfile", "# Written by z3lib with the starfile", 1)
    yield ""
    yield ""
    options = {"quote_character": writer.quote_character, "quote_all_strings": writer.quote_all_strings}
    for name, block in writer.data_blocks.items():
        if relion_version and name in ("optics", "particles"):
            yield f"# version {relion_version}"
            yield ""
        if isinstance(block, dict):
            yield from simple_block(block_name=name, data=block, **options)
            continue
        head = 3 + len(block.columns)  # data_, blank, loop_, one line per column
        lazy = wide.get(name, {})
        step = _WIDE_CHUNK_ROWS if lazy else _STAR_CHUNK_ROWS
        for start in range(0, max(len(block), 1), step):
            chunk = block.iloc[start : start + step]
            if lazy:
                chunk = chunk.copy()
                for column, source in lazy.items():
                    chunk[column] = format_coefficient_column(source[start : start + len(chunk)])
            lines = list(
                loop_block(
                    block_name=name,
                    df=chunk,
                    float_format=writer.float_format,
                    separator=writer.sep,
                    na_rep=writer.na_rep,
                    **options,
                )
            )
            yield from lines[:head] if start == 0 else ()
            yield from lines[head:-2]
        yield ""
        yield ""


#: canonical column → RELION column that carries it per particle (writable back).
_WRITE_BACK = {
    "rot": "rlnAngleRot",
    "tilt": "rlnAngleTilt",
    "psi": "rlnAnglePsi",
    "defocus_u": "rlnDefocusU",
    "defocus_v": "rlnDefocusV",
    "defocus_angle": "rlnDefocusAngle",
    "phase_shift": "rlnPhaseShift",
    "bfactor": "rlnCtfBfactor",
    "ctf_scale": "rlnCtfScalefactor",
    "random_subset": "rlnRandomSubset",
}


def _same_values(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        try:
            return bool(np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True))
        except (TypeError, ValueError):
            return False
    return bool(np.array_equal(a, b))


def _apply_table(particles: ParticleSet, rows: npt.NDArray[np.int64], out: pd.DataFrame, table: pd.DataFrame) -> None:
    """Write changed canonical values of ``table`` back into the RELION columns of ``out``."""
    from z3lib import conventions  # when needed: z3lib.io imports no other z3lib module

    base = particles.table.iloc[rows].reset_index(drop=True)
    new = table.reset_index(drop=True)
    changed = [c for c in new.columns if c in base.columns and not _same_values(new[c].to_numpy(), base[c].to_numpy())]
    shift_changed = [c for c in changed if c in ("shift_x", "shift_y")]
    other = [c for c in changed if c not in _WRITE_BACK and c not in ("shift_x", "shift_y")]
    if other:
        raise Z3InputError(
            f"write_particles_star: the table changes {', '.join(other)}, which live in the optics "
            "block or in the image names and are not written back from the table; pass them as "
            "columns= (particle block) or optics= (optics block)"
        )
    for canon in changed:
        if canon in _WRITE_BACK:
            values = new[canon].to_numpy()
            out[_WRITE_BACK[canon]] = values.astype(np.int64) if canon == "random_subset" else values
    if shift_changed:
        px = base["pixel_size"].to_numpy(dtype=np.float64)
        use_angstrom = conventions.SHIFT_COLUMNS_ANGSTROM[0] in out.columns or (
            conventions.SHIFT_COLUMNS_PIXELS[0] not in out.columns and particles.source_format != "relion3.0"
        )
        for axis, canon in enumerate(("shift_x", "shift_y")):
            shift = new[canon].to_numpy(dtype=np.float64)
            if use_angstrom:
                out[conventions.SHIFT_COLUMNS_ANGSTROM[axis]] = conventions.shift_pixels_to_angstrom(shift, px)
            else:
                out[conventions.SHIFT_COLUMNS_PIXELS[axis]] = shift


def _is_wide(values: Any) -> bool:
    """Whether ``values`` is an ``(n, 3K)`` coefficient source (formatted as the file is written)."""
    return getattr(values, "ndim", 1) == 2 and not isinstance(values, pd.DataFrame)


def _column_values(name: str, values: Any, n: int) -> Any:
    arr = values.to_numpy() if isinstance(values, (pd.Series, pd.Index)) else values
    length = len(arr) if hasattr(arr, "__len__") and not isinstance(arr, str) else None
    if length is None:
        return [arr] * n
    if length != n:
        raise Z3InputError(f"write_particles_star: column {name!r} has {length} values for {n} particles")
    return arr


def write_particles_star(
    path: PathLike,
    particles: ParticleSet,
    *,
    columns: Mapping[str, Any] | pd.DataFrame | None = None,
    zernike: ZernikeSpec | Mapping[str, Any] | None = None,
    table: pd.DataFrame | None = None,
    optics: pd.DataFrame | None = None,
) -> None:
    """Write a particle STAR that keeps every input column, plus added or updated columns.

    Parameters
    ----------
    path
        Output STAR file (written atomically).
    particles
        What :func:`read_particles` returned. RELION ≥ 3.1 input gives ``data_optics`` +
        ``data_particles``; RELION 3.0 input keeps its single block (and its name); ``.cs`` input
        gives the RELION-style ``raw`` block and the optics block built at read time.
    columns
        Columns to add (appended, in the given order) or overwrite (in place) in the particle
        block: a mapping name → values (one per output row; a 2-D ``(n, 3K)`` array, or a
        :class:`~z3lib.io.coefficients.CoefficientFile`, is formatted with
        :func:`format_coefficient_column` a few hundred rows at a time as the file is written), or
        a DataFrame (matched by position).
    zernike
        When given, a ``data_zernike3d`` block (single-value, non-loop): a
        :class:`~z3lib.zernike.ZernikeSpec`, or a mapping with the keys ``L1``, ``L2``, ``Rmax``
        (``box / 2``), ``basis`` and ``box`` (extra keys are kept).
    table
        A canonical table like :attr:`Particles.table`: its index selects (and orders) the output
        rows (a subset is fine, e.g. a cluster), and its changed per-particle values (angles,
        shifts in px, defocus, phase shift, B-factor, scale, random subset) are written back into
        the RELION columns (shifts as ``rlnOriginXAngst`` = px × pixel size for RELION ≥ 3.1 and
        ``.cs`` input, ``rlnOriginX`` for RELION 3.0 input).
    optics
        Optics block to write instead of the input's (e.g. after rescaling the images).

    Raises
    ------
    Z3InputError
        Wrong column lengths, invalid ``zernike``, unknown rows in ``table``, or table changes
        that cannot be written back.
    """
    raw = particles.raw
    if table is not None:
        idx = pd.Index(table.index)
        unknown = idx.difference(particles.table.index)
        if len(unknown):
            raise Z3InputError(
                f"write_particles_star: table rows {list(unknown[:5])} are not rows of the particles "
                f"read from {particles.path} (0…{len(particles) - 1})"
            )
        rows = particles.table.index.get_indexer(idx).astype(np.int64)
    else:
        rows = np.arange(len(raw), dtype=np.int64)
    out = raw.iloc[rows].reset_index(drop=True).copy()
    if table is not None:
        _apply_table(particles, rows, out, table)
    n = len(out)
    wide: dict[str, Any] = {}
    if columns is not None:
        items = (
            [(str(c), columns[c].to_numpy()) for c in columns.columns]
            if isinstance(columns, pd.DataFrame)
            else [(str(k), v) for k, v in columns.items()]
        )
        for name, values in items:
            if _is_wide(values):
                if len(values) != n:
                    raise Z3InputError(
                        f"write_particles_star: column {name!r} has {len(values)} rows for {n} particles"
                    )
                wide[name] = values
                out[name] = None  # its place among the columns; formatted as the file is written
            else:
                out[name] = _column_values(name, values, n)

    blocks: dict[str, Any] = {}
    optics_out = optics if optics is not None else particles.optics
    if optics_out is not None:
        blocks["optics"] = optics_out
        blocks["particles"] = out
    else:
        blocks[particles.block] = out
    if zernike is not None:
        blocks[ZERNIKE_BLOCK] = _validate_zernike(zernike)
    version = (particles.relion_version or _DEFAULT_RELION_VERSION) if optics_out is not None else None
    block = "particles" if optics_out is not None else particles.block
    write_star(path, blocks, relion_version=version, wide={block: wide})
