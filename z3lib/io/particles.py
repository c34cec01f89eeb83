"""Particle metadata: :class:`Particles`, :func:`read_particles` and :func:`apply_poses`.

:func:`read_particles` reads RELION STAR (3.0, 3.1, 4, 5 with optics groups; the reader is here,
on the blocks of :mod:`z3lib.io.relion`) and cryoSPARC ``.cs`` files (:mod:`z3lib.io.cryosparc`)
into one canonical table (:data:`z3lib.io.TABLE_COLUMNS`). Units and conventions are not re-implemented
here: they come from :mod:`z3lib.conventions`. Inside z3 shifts are in pixels and angles are
RELION ZYZ Euler angles in degrees; Ångström appear only in the files. Pixel sizes come from the
metadata, never from particle-stack MRC headers. The images are read lazily through
:meth:`Particles.images` (:class:`z3lib.io.stack.ImageStack`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from z3lib.io._common import (
    PathLike,
    Z3InputError,
    _check_readable_file,
    _make_table,
    _missing_pixel_size_error,
    _refuse_pickle,
    logger,
    release_memory,
)
from z3lib.io.cryosparc import _read_cs
from z3lib.io.relion import _read_relion_version, _read_star_raw
from z3lib.io.stack import ImageStack, _boxes_from_headers, _resolve_image_paths

#: Columns of a particle's pose: RELION ZYZ Euler angles (degrees), per particle.
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
#: Columns a particle table needs for the CTF, and where RELION usually keeps them.
_CTF_PARTICLE_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
_CTF_OPTICS_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
_PIXEL_SIZE_COLUMNS = (
    "rlnImagePixelSize",
    "rlnPixelSize",
    "rlnDetectorPixelSize",
    "rlnMagnification",
)


# ==============================================================================================
# Particles
# ==============================================================================================
@dataclass
class Particles:
    """Particle metadata read from a RELION STAR or a cryoSPARC ``.cs`` file.

    Attributes
    ----------
    table
        One row per particle, in input order, with the canonical columns of ``TABLE_COLUMNS``:
        ``image_index`` (0-based index in the stack), ``image_path`` (absolute path, ``""`` when
        no image is referenced), ``image_name`` (the ``rlnImageName`` text), ``rot``, ``tilt``,
        ``psi`` (degrees, RELION ZYZ; NaN when absent), ``shift_x``, ``shift_y`` (pixels, RELION
        sign; 0 when absent), ``defocus_u``, ``defocus_v`` (Å), ``defocus_angle`` (degrees),
        ``voltage`` (kV), ``cs`` (mm), ``amplitude_contrast``, ``phase_shift`` (degrees),
        ``bfactor`` (Å²), ``ctf_scale``, ``pixel_size`` (Å), ``box`` (px; 0 when unknown),
        ``optics_group`` (≥ 1), ``random_subset`` (0 when absent, else 1 or 2),
        ``phase_flipped``, ``ctf_premultiplied`` (bool), ``image_sign`` (+1 or −1).
    raw
        The particle block exactly as read (every column, input order). For ``.cs`` input, a
        RELION-style particle block built from the ``.cs`` (see :func:`read_particles`).
    optics
        The optics block as read (RELION ≥ 3.1), the one built for ``.cs`` input, or None.
    path
        The file read.
    source_format
        ``"relion3.0"``, ``"relion3.1"`` (also RELION 4 and 5) or ``".cs"``.
    relion_version
        The ``# version`` number of the STAR file when present (e.g. ``"30001"``, ``"50001"``).
    block
        Name of the particle block read (``"particles"``, ``"model_class_1"``, ``""``...).
    """

    table: pd.DataFrame
    raw: pd.DataFrame
    optics: pd.DataFrame | None
    path: Path
    source_format: str
    relion_version: str | None = None
    block: str = "particles"
    image_search: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def has_poses(self) -> bool:
        """True when every particle has finite Euler angles."""
        angles = self.table[["rot", "tilt", "psi"]].to_numpy(dtype=np.float64)
        return bool(len(angles) > 0 and np.isfinite(angles).all())

    def require_poses(self, reason: str) -> None:
        """Raise :class:`Z3InputError` unless every particle has finite Euler angles.

        The message names the file, exactly the pose columns (``.cs``: fields) that are missing
        and those present, or the column and first row whose values are empty or not numbers,
        and the fix. ``reason`` says why poses are needed (e.g. "z3 starts from a consensus
        refinement").
        """
        if self.has_poses:
            return
        fix = (
            "give the particles of a 3D refinement job (RELION: Refine3D/jobNNN/run_data.star; "
            "cryoSPARC: the refinement's exported particles with alignments3D)"
        )
        if self.source_format == ".cs":
            raise Z3InputError(
                f"{self.path}: the .cs file has no alignments3D/pose field (particle poses); "
                f"{reason}. Fix: {fix}, or join the refinement's passthrough file (csparc2star)"
            )
        columns = {str(c) for c in self.raw.columns}
        present = [c for c in POSE_COLUMNS if c in columns]
        missing = [c for c in POSE_COLUMNS if c not in columns]
        if missing:
            raise Z3InputError(
                f"{self.path}: the particle block data_{self.block} lacks the pose column(s) "
                f"{', '.join(missing)} (present: {', '.join(present) if present else 'none'}); "
                f"{reason}, which needs {', '.join(POSE_COLUMNS)} (degrees) for every particle. "
                f"Fix: {fix}, or add the missing column(s)"
            )
        for name, key in zip(POSE_COLUMNS, ("rot", "tilt", "psi"), strict=True):
            bad = ~np.isfinite(self.table[key].to_numpy(dtype=np.float64))
            if bad.any():
                raise Z3InputError(
                    f"{self.path}: pose column {name} is empty or not a number for {int(bad.sum())} "
                    f"particle(s) (first: row {int(np.flatnonzero(bad)[0])}); {reason}. Fix the "
                    f"value(s), or remove those particles"
                )

    @property
    def pixel_size(self) -> float:
        """The pixel size (Å) shared by all particles; ValueError if optics groups disagree."""
        sizes = self.table.groupby("optics_group", sort=True)["pixel_size"].unique()
        distinct = np.unique(np.round(self.table["pixel_size"].to_numpy(dtype=np.float64), 9))
        if len(distinct) == 1:
            return float(self.table["pixel_size"].iloc[0])
        per_group = ", ".join(f"group {g}: {', '.join(f'{v:g}' for v in vals)} Å" for g, vals in sizes.items())
        raise Z3InputError(
            f"{self.path}: particles have different pixel sizes ({per_group}); z3 processes one "
            "pixel size at a time: split the particles by optics group, or rescale them first"
        )

    @property
    def box(self) -> int:
        """The image box (px) shared by all particles; ValueError if unknown or mixed."""
        boxes = np.unique(self.table["box"].to_numpy(dtype=np.int64))
        if len(boxes) == 1 and boxes[0] > 0:
            return int(boxes[0])
        if np.any(boxes <= 0):
            raise Z3InputError(
                f"{self.path}: the image box size is unknown for some particles (no rlnImageSize "
                "and their stack files were not found); set `image_root` (the pipeline's config key, or "
                "read_particles' argument) so the stacks are found, or add rlnImageSize to the optics block"
            )
        per_group = self.table.groupby("optics_group", sort=True)["box"].unique()
        detail = ", ".join(f"group {g}: {list(map(int, v))} px" for g, v in per_group.items())
        raise Z3InputError(
            f"{self.path}: mixed box sizes ({detail}); z3 needs one box size: re-extract or "
            "rescale the particles to a common box"
        )

    def images(self, *, cache_size: int = 64) -> ImageStack:
        """Lazy, memory-mapped access to the particle images (see :class:`ImageStack`)."""
        return ImageStack(self, cache_size=cache_size)


def particle_identity(particles: Particles) -> list[str]:
    """Return one name per row that traces the particle back to its input image.

    The ``rlnImageOriginalName`` column when the file has one (a stage that rewrote the images, e.g.
    preprocess), else ``rlnImageName`` (``image_name``).
    """
    if "rlnImageOriginalName" in particles.raw.columns:
        return [str(v).strip() for v in particles.raw["rlnImageOriginalName"]]
    return [str(v).strip() for v in particles.table["image_name"]]


def apply_poses(particles: Particles, poses: Particles) -> Particles:
    """``particles`` with the poses and CTF of ``poses``: the latest ones of the same particles.

    ``particles`` is typically the preprocess stage's STAR (processing box, whose images are
    read); ``poses`` a later stage's STAR of the same particles in the same order (refine or
    predict: the user's STAR as given, original box), whose ``rot``/``tilt``/``psi`` (degrees),
    ``shift_x``/``shift_y`` and ``defocus_u``/``defocus_v`` (Å)/``defocus_angle`` (degrees)
    replace those of ``particles``. Shifts are converted through Å, row by row: px of ``poses``
    (its pixel size) → px of ``particles`` (its pixel size). Images, optics, half sets and every
    other column stay those of ``particles``; ``raw`` is not changed (this is for reading, not
    for writing a STAR).

    Rows correspond when ``poses``' ``rlnImageName`` (or, for a processing-box STAR, its
    ``rlnImageOriginalName``) equals :func:`particle_identity` of ``particles``, row for row.

    Raises
    ------
    Z3InputError
        Different particle counts, rows that do not correspond (the first one is named), or
        ``poses`` without complete poses; the message names both files.
    """
    from z3lib import conventions  # when needed: z3lib.io imports no other z3lib module

    n, m = len(particles), len(poses)
    both = f"{poses.path} (poses) and {particles.path} (particles)"
    if n != m:
        raise Z3InputError(
            f"{both} hold {m} and {n} particles: the poses must be of the same particles in the same "
            "order (the STAR a later stage of the same run wrote)"
        )
    want = particle_identity(particles)
    have = [[str(v).strip() for v in poses.table["image_name"]]]
    if "rlnImageOriginalName" in poses.raw.columns:
        have.append([str(v).strip() for v in poses.raw["rlnImageOriginalName"]])
    if not any(names == want for names in have):
        row = next(i for i in range(n) if all(names[i] != want[i] for names in have))
        raise Z3InputError(
            f"{both} do not hold the same particles in the same order: row {row + 1} is "
            f"{have[0][row]!r} in the poses but {want[row]!r} in the particles; give the STAR of "
            "the same run (same particles, same order)"
        )
    poses.require_poses(f"the poses of {particles.path} are taken from it")
    table = particles.table.copy()
    src = poses.table
    for name in ("rot", "tilt", "psi", "defocus_u", "defocus_v", "defocus_angle"):
        table[name] = src[name].to_numpy(np.float64)
    apix_from = src["pixel_size"].to_numpy(np.float64)
    apix_to = table["pixel_size"].to_numpy(np.float64)
    for name in ("shift_x", "shift_y"):
        angstrom = conventions.shift_pixels_to_angstrom(src[name].to_numpy(np.float64), apix_from)
        table[name] = conventions.shift_angstrom_to_pixels(angstrom, apix_to)
    return dataclasses.replace(particles, table=table)


def read_particles(
    path: PathLike,
    *,
    pixel_size: float | None = None,
    image_root: PathLike | None = None,
) -> Particles:
    """Read particle metadata from a RELION STAR (3.0, 3.1, 4, 5) or cryoSPARC ``.cs`` file.

    Parameters
    ----------
    path
        ``.star`` or ``.cs`` file (the format is sniffed when the suffix is neither).
    pixel_size
        Override (Å) of the particle pixel size; otherwise it comes from the metadata
        (:func:`z3lib.conventions.resolve_pixel_size` on each optics-merged row, or the ``.cs``
        ``blob/psize_A``), never from MRC headers.
    image_root
        Folder against which relative image paths are resolved. Without it, paths are tried
        relative to the STAR/``.cs`` folder, then up to 4 of its parents (RELION paths are
        relative to the project folder), then the current folder; the first existing file wins.
        A missing stack is not an error here (metadata-only files are fine).

    Returns
    -------
    Particles

    Raises
    ------
    Z3InputError
        Missing file, pickle, unreadable file, empty particle block, missing ``rlnImageName`` or
        CTF columns, particles whose optics group is not in the optics block, or no pixel size.
    """
    p = Path(path)
    _check_readable_file(p, "particle file")
    _refuse_pickle(p)
    if pixel_size is not None and not (math.isfinite(float(pixel_size)) and pixel_size > 0):
        raise Z3InputError(f"pixel_size={pixel_size!r} for {p}: it must be a positive number (Å)")
    root = Path(image_root) if image_root is not None else None
    if p.suffix.lower() == ".cs" or (p.suffix.lower() != ".star" and _is_npy(p)):
        cs = _read_cs(p, pixel_size=pixel_size, image_root=root)
        out = Particles(
            table=cs.table,
            raw=cs.raw,
            optics=cs.optics,
            path=p,
            source_format=".cs",
            relion_version=None,
            block="particles",
            image_search=cs.image_search,
        )
    else:
        out = _read_star_particles(p, pixel_size=pixel_size, image_root=root)
    # the parse's scratch (2–3× the tables) would otherwise stay resident for the process's life
    release_memory()
    return out


def _is_npy(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(6) == b"\x93NUMPY"
    except OSError:
        return False


# ==============================================================================================
# The RELION STAR particle reader
# ==============================================================================================
def _choose_particle_block(path: Path, blocks: Mapping[str, Any]) -> tuple[str, pd.DataFrame]:
    def as_frame(block: Any) -> pd.DataFrame | None:
        if isinstance(block, pd.DataFrame):
            return block
        return None

    if "particles" in blocks:
        frame = as_frame(blocks["particles"])
        if frame is None:  # a single-particle file written as a non-loop block
            frame = pd.DataFrame({k: [v] for k, v in dict(blocks["particles"]).items()})
        return "particles", frame
    loops = [(n, b) for n, b in blocks.items() if isinstance(b, pd.DataFrame) and n != "optics"]
    for name, frame in loops:
        if "rlnImageName" in frame.columns:
            return name, frame
    for name, block in blocks.items():
        if isinstance(block, dict) and "rlnImageName" in block:
            return name, pd.DataFrame({k: [v] for k, v in block.items()})
    if loops:
        return loops[0]
    raise Z3InputError(
        f"{path} has no particle loop block (blocks found: "
        f"{', '.join(repr('data_' + n) for n in blocks)}); a particle STAR needs a data_particles "
        "block (RELION ≥ 3.1) or a loop with rlnImageName (RELION 3.0)"
    )


def _merge_optics(path: Path, block: str, raw: pd.DataFrame, optics: pd.DataFrame) -> pd.DataFrame:
    """Particle block with the optics columns joined on ``rlnOpticsGroup`` (particle columns win)."""
    if "rlnOpticsGroup" not in optics.columns:
        raise Z3InputError(
            f"{path}: the data_optics block has no rlnOpticsGroup column; RELION ≥ 3.1 optics "
            "blocks number their groups in rlnOpticsGroup"
        )
    particles = raw.copy()
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) == 1:
            particles["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
        else:
            raise Z3InputError(
                f"{path}: block data_{block} has no rlnOpticsGroup column but the optics block "
                f"holds {len(optics)} groups; add rlnOpticsGroup to the particles"
            )
    groups = pd.to_numeric(particles["rlnOpticsGroup"], errors="coerce")
    known = set(pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce").tolist())
    unknown_mask = ~groups.isin(list(known))
    if unknown_mask.any():
        first = int(np.flatnonzero(unknown_mask.to_numpy())[0])
        bad = sorted(set(groups[unknown_mask].tolist()), key=str)
        raise Z3InputError(
            f"{path}: {int(unknown_mask.sum())} particles (first: row {first}) belong to optics "
            f"group(s) {bad} that the data_optics block does not define (it has "
            f"{sorted(known)}); fix rlnOpticsGroup or the optics block"
        )
    extra = [c for c in optics.columns if c not in particles.columns]
    opt = optics[["rlnOpticsGroup", *extra]].copy()
    opt["rlnOpticsGroup"] = pd.to_numeric(opt["rlnOpticsGroup"], errors="coerce")
    if opt["rlnOpticsGroup"].duplicated().any():
        raise Z3InputError(f"{path}: the data_optics block defines an optics group twice")
    left = particles.copy()
    left["rlnOpticsGroup"] = groups
    merged = left.merge(opt, on="rlnOpticsGroup", how="left", sort=False)
    merged.index = raw.index
    return merged


def _float_column(frame: pd.DataFrame, name: str, default: float) -> npt.NDArray[np.float64]:
    if name not in frame.columns:
        return np.full(len(frame), default, dtype=np.float64)
    values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(values, dtype=np.float64)


def _resolve_pixel_sizes(merged: pd.DataFrame) -> npt.NDArray[np.float64]:
    """Per-row pixel size via :func:`conventions.resolve_pixel_size` (NaN where none)."""
    from z3lib import conventions  # when needed: z3lib.io imports no other z3lib module

    cols = [c for c in _PIXEL_SIZE_COLUMNS if c in merged.columns]
    n = len(merged)
    if not cols:
        return np.full(n, np.nan)
    sub = merged[cols].apply(pd.to_numeric, errors="coerce")
    gid = sub.groupby(cols, dropna=False, sort=False).ngroup().to_numpy()
    firsts = pd.Series(np.arange(n)).groupby(gid).first().to_numpy()
    values = np.full(gid.max() + 1 if n else 0, np.nan)
    for g, row in enumerate(firsts):
        record = {c: v for c, v in sub.iloc[int(row)].items() if pd.notna(v)}
        size = conventions.resolve_pixel_size(record)
        values[g] = np.nan if size is None else size
    return values[gid] if n else np.zeros(0)


def _check_ctf_columns(path: Path, block: str, merged: pd.DataFrame, has_optics: bool) -> None:
    missing = [c for c in (*_CTF_PARTICLE_COLUMNS, *_CTF_OPTICS_COLUMNS) if c not in merged.columns]
    if not missing:
        return
    where = []
    particle_missing = [c for c in missing if c in _CTF_PARTICLE_COLUMNS]
    optics_missing = [c for c in missing if c in _CTF_OPTICS_COLUMNS]
    if particle_missing:
        where.append(f"{', '.join(particle_missing)} belong in the particle block data_{block}")
    if optics_missing:
        where.append(
            f"{', '.join(optics_missing)} belong in the data_optics block"
            + (
                " (the file has one, but not these columns)"
                if has_optics
                else " (RELION ≥ 3.1) or in each particle row (RELION 3.0)"
            )
        )
    present = [c for c in (*_CTF_PARTICLE_COLUMNS, *_CTF_OPTICS_COLUMNS) if c in merged.columns]
    raise Z3InputError(
        f"{path}: missing CTF column(s) {', '.join(missing)} (present: "
        f"{', '.join(present) if present else 'none'}): {'; '.join(where)}. z3 needs "
        "the CTF of every particle: export the STAR from the CTF-refined job, or add the columns"
    )


def _check_shift_columns(path: Path, block: str, merged: pd.DataFrame) -> None:
    """Refuse a half origin-shift pair (e.g. rlnOriginXAngst without rlnOriginYAngst).

    The shifts would otherwise silently read as zero.
    """
    from z3lib import conventions  # when needed: z3lib.io imports no other z3lib module

    columns = set(map(str, merged.columns))
    if any(
        all(c in columns for c in pair)
        for pair in (conventions.SHIFT_COLUMNS_ANGSTROM, conventions.SHIFT_COLUMNS_PIXELS)
    ):
        return
    for pair in (conventions.SHIFT_COLUMNS_ANGSTROM, conventions.SHIFT_COLUMNS_PIXELS):
        present = [c for c in pair if c in columns]
        if present:
            missing = [c for c in pair if c not in columns]
            raise Z3InputError(
                f"{path}: the particle block data_{block} has the origin shift column "
                f"{', '.join(present)} but not {', '.join(missing)}; a particle's shift needs both "
                f"({', '.join(pair)}). Fix: add {', '.join(missing)}, or remove {', '.join(present)} "
                "if the particles are centred (shifts 0)"
            )


def _check_finite(path: Path, what: str, names: Sequence[str], arrays: Sequence[npt.NDArray[Any]]) -> None:
    for name, arr in zip(names, arrays, strict=True):
        bad = ~np.isfinite(arr)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise Z3InputError(
                f"{path}: column {name} ({what}) is empty or not a number for "
                f"{int(bad.sum())} particle(s) (first: row {row}); fix the value(s)"
            )


def _split_image_names(path: Path, names: pd.Series) -> tuple[npt.NDArray[np.int64], list[str]]:
    """``N@stack`` → (0-based index N−1, stack); a bare path → (0, path)."""
    text = names.astype("string").fillna("")
    has_at = text.str.contains("@", regex=False).to_numpy(dtype=bool)
    parts = text.str.partition("@")
    number = pd.to_numeric(parts[0].where(has_at, "1").str.strip(), errors="coerce")
    stack = parts[2].where(has_at, text).str.strip().str.lstrip(">")
    bad = ~np.isfinite(number.to_numpy(dtype=np.float64, na_value=np.nan))
    bad |= number.to_numpy(dtype=np.float64, na_value=np.nan) < 1
    empty = (stack == "").to_numpy(dtype=bool)
    if bad.any() or empty.any():
        row = int(np.flatnonzero(bad | empty)[0])
        raise Z3InputError(
            f"{path}: rlnImageName of row {row} is {text.iloc[row]!r}; expected 'N@stack.mrcs' "
            "with N ≥ 1 (1-based image number) or a plain file name"
        )
    index = number.to_numpy(dtype=np.float64).astype(np.int64) - 1
    return index, stack.tolist()


def _bool_column(frame: pd.DataFrame, name: str) -> npt.NDArray[np.bool_]:
    if name not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    values = pd.to_numeric(frame[name], errors="coerce").fillna(0).to_numpy(dtype=np.float64)
    return np.asarray(values != 0, dtype=bool)


def _read_particle_block(path: Path) -> tuple[str, pd.DataFrame, pd.DataFrame | None, pd.DataFrame]:
    """Read the particle block of a STAR file.

    Returns its name, the rows as read, the optics block or None, and the rows with the optics
    columns joined; refused when empty, without ``rlnImageName``, without CTF columns or with half
    an origin-shift pair.
    """
    blocks = _read_star_raw(path)
    block, raw = _choose_particle_block(path, blocks)
    optics_block = blocks.get("optics")
    optics = optics_block if isinstance(optics_block, pd.DataFrame) else None
    if optics is not None and block != "particles":
        logger.debug("%s: joining data_optics to data_%s", path, block)
    raw = raw.reset_index(drop=True)
    if len(raw) == 0:
        raise Z3InputError(f"{path}: the particle block data_{block} is empty (no rows); nothing to process")
    if "rlnImageName" not in raw.columns:
        raise Z3InputError(
            f"{path}: block data_{block} has no rlnImageName column; z3 needs each particle's "
            "image ('N@stack.mrcs'). Columns found: " + ", ".join(map(str, raw.columns)) + ". "
            "Fix: give the particles STAR (e.g. Refine3D/jobNNN/run_data.star, not run_model.star "
            "or run_optimiser.star), or add rlnImageName"
        )
    merged = _merge_optics(path, block, raw, optics) if optics is not None else raw
    _check_ctf_columns(path, block, merged, optics is not None)
    _check_shift_columns(path, block, merged)
    return block, raw, optics, merged


def _star_pixel_sizes(path: Path, merged: pd.DataFrame, pixel_size: float | None) -> npt.NDArray[np.float64]:
    """Return the per-particle pixel size (Å).

    The override (logged when it differs from the metadata's), else the metadata's
    (:func:`_resolve_pixel_sizes`), an error where there is none.
    """
    if pixel_size is not None:
        px = np.full(len(merged), float(pixel_size))
        from_meta = _resolve_pixel_sizes(merged)
        if np.any(np.isfinite(from_meta) & ~np.isclose(from_meta, px, rtol=1e-6)):
            logger.info(
                "%s: pixel_size=%g overrides the metadata's %s Å",
                path,
                pixel_size,
                ", ".join(f"{v:g}" for v in np.unique(from_meta[np.isfinite(from_meta)])),
            )
        return px
    px = _resolve_pixel_sizes(merged)
    bad = ~np.isfinite(px)
    if bad.any():
        raise _missing_pixel_size_error(path, np.flatnonzero(bad))
    return px


def _star_shifts(
    path: Path, merged: pd.DataFrame, px: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Return the origin shifts ``(x, y)`` in pixels.

    ``rlnOriginX/YAngst`` ÷ pixel size, else ``rlnOriginX/Y`` (RELION 3.0, already px), else 0;
    non-numbers are refused.
    """
    from z3lib import conventions  # when needed: z3lib.io imports no other z3lib module

    n = len(merged)
    if all(c in merged.columns for c in conventions.SHIFT_COLUMNS_ANGSTROM):
        sx = conventions.shift_angstrom_to_pixels(_float_column(merged, conventions.SHIFT_COLUMNS_ANGSTROM[0], 0.0), px)
        sy = conventions.shift_angstrom_to_pixels(_float_column(merged, conventions.SHIFT_COLUMNS_ANGSTROM[1], 0.0), px)
        shift_names = conventions.SHIFT_COLUMNS_ANGSTROM
    elif all(c in merged.columns for c in conventions.SHIFT_COLUMNS_PIXELS):
        sx = _float_column(merged, conventions.SHIFT_COLUMNS_PIXELS[0], 0.0)
        sy = _float_column(merged, conventions.SHIFT_COLUMNS_PIXELS[1], 0.0)
        shift_names = conventions.SHIFT_COLUMNS_PIXELS
    else:
        sx = np.zeros(n)
        sy = np.zeros(n)
        shift_names = ("", "")
    if shift_names[0]:
        _check_finite(path, "origin shift", shift_names, [sx, sy])
    return sx, sy


def _star_images(
    path: Path, raw: pd.DataFrame, merged: pd.DataFrame, image_root: Path | None
) -> tuple[npt.NDArray[np.int64], list[str], npt.NDArray[np.int64], dict[str, list[str]]]:
    """Return the image indices, stack paths, boxes and tried places of the particles of a STAR.

    0-based image indices, absolute stack paths, boxes (px: ``rlnImageSize``, else the stack
    headers) and the places tried for each stack, from ``rlnImageName``.
    """
    image_index, stacks = _split_image_names(path, raw["rlnImageName"])
    resolved, tried = _resolve_image_paths(path, sorted(set(stacks)), image_root)
    image_paths = [resolved.get(s, "") for s in stacks]
    if "rlnImageSize" in merged.columns:
        box = pd.to_numeric(merged["rlnImageSize"], errors="coerce").fillna(0).to_numpy()
        box = box.astype(np.int64)
    else:
        box = _boxes_from_headers(image_paths)
    return image_index, image_paths, box, tried


def _read_star_particles(path: Path, *, pixel_size: float | None, image_root: Path | None) -> Particles:
    """Read a RELION particle STAR (see :func:`read_particles` for the arguments)."""
    block, raw, optics, merged = _read_particle_block(path)
    n = len(raw)
    px = _star_pixel_sizes(path, merged, pixel_size)
    sx, sy = _star_shifts(path, merged, px)

    ctf_names = (*_CTF_PARTICLE_COLUMNS, *_CTF_OPTICS_COLUMNS)
    ctf = {c: _float_column(merged, c, np.nan) for c in ctf_names}
    _check_finite(path, "CTF", ctf_names, [ctf[c] for c in ctf_names])

    image_index, image_paths, box, tried = _star_images(path, raw, merged, image_root)
    optics_group = (
        pd.to_numeric(merged["rlnOpticsGroup"], errors="coerce").fillna(1).to_numpy().astype(np.int64)
        if "rlnOpticsGroup" in merged.columns
        else np.ones(n, dtype=np.int64)
    )
    table = _make_table(
        {
            "image_index": image_index,
            "image_path": image_paths,
            "image_name": raw["rlnImageName"].astype(str).tolist(),
            "rot": _float_column(merged, "rlnAngleRot", np.nan),
            "tilt": _float_column(merged, "rlnAngleTilt", np.nan),
            "psi": _float_column(merged, "rlnAnglePsi", np.nan),
            "shift_x": sx,
            "shift_y": sy,
            "defocus_u": ctf["rlnDefocusU"],
            "defocus_v": ctf["rlnDefocusV"],
            "defocus_angle": ctf["rlnDefocusAngle"],
            "voltage": ctf["rlnVoltage"],
            "cs": ctf["rlnSphericalAberration"],
            "amplitude_contrast": ctf["rlnAmplitudeContrast"],
            "phase_shift": np.nan_to_num(_float_column(merged, "rlnPhaseShift", 0.0), nan=0.0),
            "bfactor": np.nan_to_num(_float_column(merged, "rlnCtfBfactor", 0.0), nan=0.0),
            "ctf_scale": np.nan_to_num(_float_column(merged, "rlnCtfScalefactor", 1.0), nan=1.0),
            "pixel_size": px,
            "box": box,
            "optics_group": optics_group,
            "random_subset": np.nan_to_num(_float_column(merged, "rlnRandomSubset", 0.0)).astype(np.int64),
            "phase_flipped": _bool_column(merged, "rlnCtfDataArePhaseFlipped"),
            "ctf_premultiplied": _bool_column(merged, "rlnCtfDataAreCtfPremultiplied"),
            "image_sign": np.ones(n),
        }
    )
    return Particles(
        table=table,
        raw=raw,
        optics=optics,
        path=path,
        source_format="relion3.1" if optics is not None else "relion3.0",
        relion_version=_read_relion_version(path),
        block=block,
        image_search=tried,
    )
