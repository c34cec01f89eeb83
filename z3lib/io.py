"""File input and output of z3: particles, images, maps, coefficients and atomic models.

What lives here (design.md §4): RELION STAR (3.0, 3.1, 4, 5 with optics groups) and cryoSPARC
``.cs`` particle metadata, lazy memory-mapped MRC/MRCS particle stacks, MRC maps, coefficient files
(``.npy``, the Flexutils ``zernikeCoefficients`` STAR column, Xmipp/Flexutils ``z_clnm`` text
files) and atomic models (PDB/mmCIF through gemmi).

Units and conventions are not re-implemented here: they come from :mod:`z3lib.conventions`.
Inside z3 shifts are in pixels and angles are RELION ZYZ Euler angles in degrees; Ångström appear
only in the files. Pixel sizes come from the metadata, never from particle-stack MRC headers.

Every writer is atomic (:func:`atomic_path`): a temporary file in the destination folder is renamed
over the destination only when writing succeeded. Nothing here ever unpickles a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import gemmi
import mrcfile
import numpy as np
import numpy.typing as npt
import pandas as pd
import starfile

from z3lib import conventions

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = [
    "POSE_COLUMNS",
    "ZERNIKE_BLOCK",
    "ZERNIKE_COLUMN",
    "AtomicModel",
    "ImageStack",
    "MapData",
    "Particles",
    "Z3InputError",
    "apply_poses",
    "atomic_path",
    "format_coefficient_column",
    "parse_coefficient_column",
    "particle_identity",
    "read_coefficients",
    "read_map",
    "read_model",
    "read_particles",
    "read_star_blocks",
    "read_zernike_file",
    "write_bytes",
    "write_coefficients",
    "write_map",
    "write_model_pdb",
    "write_particles_star",
    "write_stack",
    "write_text",
    "write_xmipp_particles",
    "write_zernike_file",
]

#: Flexutils column holding the 3K Zernike3D coefficients of a particle (comma-separated).
ZERNIKE_COLUMN = "zernikeCoefficients"
#: Name of the single-row STAR block describing the Zernike3D basis of ``ZERNIKE_COLUMN``.
ZERNIKE_BLOCK = "zernike3d"
_ZERNIKE_KEYS = ("L1", "L2", "Rmax", "basis", "box")

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
#: Optics-level columns of a RELION ≥ 3.1 optics block that z3 builds for cryoSPARC input.
_CS_OPTICS_COLUMNS = (
    "rlnOpticsGroup",
    "rlnOpticsGroupName",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
)
_DEFAULT_RELION_VERSION = "30001"
_MAX_PARENT_LEVELS = 4
_PICKLE_MESSAGE = "z3 never unpickles files; convert to STAR or .cs"

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


def copy_file(source: PathLike, destination: PathLike) -> Path:
    """Copy a file's bytes to ``destination`` atomically (a temporary file renamed over it), so
    that a reader never sees a half-written copy; missing parent folders are created."""
    import shutil

    src = Path(source)
    _check_readable_file(src, "file")
    with atomic_path(destination) as tmp:
        shutil.copyfile(src, tmp)
    return Path(destination)


# ==============================================================================================
# Small helpers
# ==============================================================================================
def _check_readable_file(path: Path, what: str) -> None:
    if not path.exists():
        raise Z3InputError(f"{what} {path} does not exist; check the path (relative paths are "
                           f"taken from the current folder {Path.cwd()})")
    if path.is_dir():
        raise Z3InputError(f"{what} {path} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise Z3InputError(f"{what} {path} is not readable (permissions)")


def _looks_like_pickle(path: Path) -> bool:
    """True for ``.pkl``/``.pickle`` names or files starting with a pickle protocol ≥ 2 header."""
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


def _read_relion_version(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(8192)
    except OSError:
        return None
    match = re.search(r"^#\s*version\s+(\d+)", head, flags=re.MULTILINE)
    return match.group(1) if match else None


def _count_terms(l1: int, l2: int) -> int:
    """Zernike3D terms per axis: K = Σ_{h=0}^{L2} (2h+1)(⌊(L1−h)/2⌋+1) (0 for invalid degrees)."""
    if l1 < 0 or l2 < 0 or l2 > l1:
        return 0
    from z3lib.zernike import count_terms  # z3lib.zernike re-exports this module's file helpers

    return count_terms(l1, l2)


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
        fix = ("give the particles of a 3D refinement job (RELION: Refine3D/jobNNN/run_data.star; "
               "cryoSPARC: the refinement's exported particles with alignments3D)")
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
        per_group = ", ".join(
            f"group {g}: {', '.join(f'{v:g}' for v in vals)} Å" for g, vals in sizes.items()
        )
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
    """One name per row that traces the particle back to its input image: the
    ``rlnImageOriginalName`` column when the file has one (a stage that rewrote the images, e.g.
    preprocess), else ``rlnImageName`` (``image_name``)."""
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
    n, m = len(particles), len(poses)
    both = f"{poses.path} (poses) and {particles.path} (particles)"
    if n != m:
        raise Z3InputError(f"{both} hold {m} and {n} particles: the poses must be of the same particles in the same "
                           "order (the STAR a later stage of the same run wrote)")
    want = particle_identity(particles)
    have = [[str(v).strip() for v in poses.table["image_name"]]]
    if "rlnImageOriginalName" in poses.raw.columns:
        have.append([str(v).strip() for v in poses.raw["rlnImageOriginalName"]])
    if not any(names == want for names in have):
        row = next(i for i in range(n) if all(names[i] != want[i] for names in have))
        raise Z3InputError(f"{both} do not hold the same particles in the same order: row {row + 1} is "
                           f"{have[0][row]!r} in the poses but {want[row]!r} in the particles; give the STAR of "
                           "the same run (same particles, same order)")
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
        return _read_cs(p, pixel_size=pixel_size, image_root=root)
    return _read_star_particles(p, pixel_size=pixel_size, image_root=root)


def _is_npy(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(6) == b"\x93NUMPY"
    except OSError:
        return False


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


def _merge_optics(
    path: Path, block: str, raw: pd.DataFrame, optics: pd.DataFrame
) -> pd.DataFrame:
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


def _missing_pixel_size_error(path: Path, rows: npt.NDArray[np.int64]) -> Z3InputError:
    return Z3InputError(
        f"{path}: no pixel size for {len(rows)} particle(s) (first: row {int(rows[0])}); looked "
        "for rlnImagePixelSize (optics block), rlnPixelSize, and rlnDetectorPixelSize with "
        "rlnMagnification. MRC headers of particle stacks are never used. Pass pixel_size= to "
        "read_particles (or set the pixel size in the config)"
    )


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
            + (" (the file has one, but not these columns)" if has_optics else
               " (RELION ≥ 3.1) or in each particle row (RELION 3.0)")
        )
    present = [c for c in (*_CTF_PARTICLE_COLUMNS, *_CTF_OPTICS_COLUMNS) if c in merged.columns]
    raise Z3InputError(
        f"{path}: missing CTF column(s) {', '.join(missing)} (present: "
        f"{', '.join(present) if present else 'none'}): {'; '.join(where)}. z3 needs "
        "the CTF of every particle: export the STAR from the CTF-refined job, or add the columns"
    )


def _check_shift_columns(path: Path, block: str, merged: pd.DataFrame) -> None:
    """A half origin-shift pair (e.g. rlnOriginXAngst without rlnOriginYAngst) is an error: the
    shifts would otherwise silently read as zero."""
    columns = set(map(str, merged.columns))
    if any(all(c in columns for c in pair)
           for pair in (conventions.SHIFT_COLUMNS_ANGSTROM, conventions.SHIFT_COLUMNS_PIXELS)):
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
    for name, arr in zip(names, arrays):
        bad = ~np.isfinite(arr)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise Z3InputError(
                f"{path}: column {name} ({what}) is empty or not a number for "
                f"{int(bad.sum())} particle(s) (first: row {row}); fix the value(s)"
            )


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


def _bool_column(frame: pd.DataFrame, name: str) -> npt.NDArray[np.bool_]:
    if name not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    values = pd.to_numeric(frame[name], errors="coerce").fillna(0).to_numpy(dtype=np.float64)
    return np.asarray(values != 0, dtype=bool)


def _make_table(columns: dict[str, Any]) -> pd.DataFrame:
    table = pd.DataFrame({name: columns[name] for name in TABLE_COLUMNS})
    table["image_index"] = table["image_index"].astype(np.int64)
    table["box"] = table["box"].astype(np.int64)
    table["optics_group"] = table["optics_group"].astype(np.int64)
    table["random_subset"] = table["random_subset"].astype(np.int64)
    table["phase_flipped"] = table["phase_flipped"].astype(bool)
    table["ctf_premultiplied"] = table["ctf_premultiplied"].astype(bool)
    return table


def _read_star_particles(path: Path, *, pixel_size: float | None, image_root: Path | None) -> Particles:
    blocks = _read_star_raw(path)
    block, raw = _choose_particle_block(path, blocks)
    optics_block = blocks.get("optics")
    optics = optics_block if isinstance(optics_block, pd.DataFrame) else None
    if optics is not None and block != "particles":
        logger.debug("%s: joining data_optics to data_%s", path, block)
    raw = raw.reset_index(drop=True)
    if len(raw) == 0:
        raise Z3InputError(
            f"{path}: the particle block data_{block} is empty (no rows); nothing to process"
        )
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
    n = len(raw)

    if pixel_size is not None:
        px = np.full(n, float(pixel_size))
        from_meta = _resolve_pixel_sizes(merged)
        if np.any(np.isfinite(from_meta) & ~np.isclose(from_meta, px, rtol=1e-6)):
            logger.info("%s: pixel_size=%g overrides the metadata's %s Å", path, pixel_size,
                        ", ".join(f"{v:g}" for v in np.unique(from_meta[np.isfinite(from_meta)])))
    else:
        px = _resolve_pixel_sizes(merged)
        bad = ~np.isfinite(px)
        if bad.any():
            raise _missing_pixel_size_error(path, np.flatnonzero(bad))

    if all(c in merged.columns for c in conventions.SHIFT_COLUMNS_ANGSTROM):
        sx = conventions.shift_angstrom_to_pixels(
            _float_column(merged, conventions.SHIFT_COLUMNS_ANGSTROM[0], 0.0), px
        )
        sy = conventions.shift_angstrom_to_pixels(
            _float_column(merged, conventions.SHIFT_COLUMNS_ANGSTROM[1], 0.0), px
        )
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

    ctf_names = (*_CTF_PARTICLE_COLUMNS, *_CTF_OPTICS_COLUMNS)
    ctf = {c: _float_column(merged, c, np.nan) for c in ctf_names}
    _check_finite(path, "CTF", ctf_names, [ctf[c] for c in ctf_names])

    image_index, stacks = _split_image_names(path, raw["rlnImageName"])
    resolved, tried = _resolve_image_paths(path, sorted(set(stacks)), image_root)
    image_paths = [resolved.get(s, "") for s in stacks]
    if "rlnImageSize" in merged.columns:
        box = pd.to_numeric(merged["rlnImageSize"], errors="coerce").fillna(0).to_numpy()
        box = box.astype(np.int64)
    else:
        box = _boxes_from_headers(image_paths)

    optics_group = (
        pd.to_numeric(merged["rlnOpticsGroup"], errors="coerce").fillna(1).to_numpy().astype(np.int64)
        if "rlnOpticsGroup" in merged.columns else np.ones(n, dtype=np.int64)
    )
    table = _make_table({
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
    })
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


def _read_cs(path: Path, *, pixel_size: float | None, image_root: Path | None) -> Particles:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise Z3InputError(
                f"{path} holds Python objects (an object-dtype array that only unpickling could "
                f"read): {_PICKLE_MESSAGE}"
            ) from exc
        raise Z3InputError(f"could not read {path} as a cryoSPARC .cs file: {exc}") from exc
    except Exception as exc:
        raise Z3InputError(
            f"could not read {path} as a cryoSPARC .cs file ({type(exc).__name__}: {exc}); a .cs "
            "file is a numpy structured array saved by cryoSPARC"
        ) from exc
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None or arr.ndim != 1:
        raise Z3InputError(
            f"{path} is not a cryoSPARC particle table (expected a 1-D numpy structured array, got "
            f"{getattr(arr, 'dtype', type(arr))} with shape {getattr(arr, 'shape', None)})"
        )
    if any(arr.dtype[name].hasobject for name in arr.dtype.names):
        raise Z3InputError(f"{path} holds Python objects: {_PICKLE_MESSAGE}")
    n = len(arr)
    if n == 0:
        raise Z3InputError(f"{path}: the .cs file holds no particles")
    fields = set(arr.dtype.names)

    needed = ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm",
              "ctf/amp_contrast")
    missing = [f for f in needed if f not in fields]
    if missing:
        present = [f for f in needed if f in fields]
        raise Z3InputError(
            f"{path}: missing CTF field(s) {', '.join(missing)} (present: "
            f"{', '.join(present) if present else 'none'}); cryoSPARC often keeps the CTF in "
            "the job's passthrough file (…_passthrough_particles.cs): export the particles from "
            "cryoSPARC (or with csparc2star) so that blob/*, ctf/* and alignments3D/* are in one file"
        )

    # pixel size: override > blob/psize_A > alignments3D/psize_A
    blob_px = _float32_to_decimal(arr["blob/psize_A"]) if "blob/psize_A" in fields else None
    align_px = (
        _float32_to_decimal(arr["alignments3D/psize_A"]) if "alignments3D/psize_A" in fields else None
    )
    if pixel_size is not None:
        px = np.full(n, float(pixel_size))
    elif blob_px is not None:
        px = blob_px
    elif align_px is not None:
        px = align_px
    else:
        raise Z3InputError(
            f"{path}: no pixel size; looked for the .cs fields blob/psize_A and "
            "alignments3D/psize_A. Pass pixel_size= to read_particles (or set it in the config)"
        )
    bad = ~(np.isfinite(px) & (px > 0))
    if bad.any():
        raise _missing_pixel_size_error(path, np.flatnonzero(bad))

    if "alignments3D/pose" in fields:
        matrices = conventions.cryosparc_pose_to_relion_matrix(arr["alignments3D/pose"].astype(np.float64))
        rot, tilt, psi = conventions.matrix_to_euler(matrices)
        has_pose = True
    else:
        rot = tilt = psi = np.full(n, np.nan)
        has_pose = False
    if "alignments3D/shift" in fields:
        shift = arr["alignments3D/shift"].astype(np.float64).reshape(n, 2)
        if blob_px is not None and align_px is not None:
            ratio = align_px / blob_px
            if np.any(np.abs(ratio - 1.0) > 1e-4):
                logger.warning(
                    "%s: alignments3D/psize_A differs from blob/psize_A; shifts rescaled to "
                    "pixels of the particle images", path,
                )
                shift = shift * ratio[:, None]
        sx, sy = shift[:, 0].copy(), shift[:, 1].copy()
        has_shift = True
    else:
        sx, sy = np.zeros(n), np.zeros(n)
        has_shift = False

    defocus_u = _float32_to_decimal(arr["ctf/df1_A"])
    defocus_v = _float32_to_decimal(arr["ctf/df2_A"])
    defocus_angle = np.rad2deg(arr["ctf/df_angle_rad"].astype(np.float64))
    phase_shift = (
        np.rad2deg(arr["ctf/phase_shift_rad"].astype(np.float64))
        if "ctf/phase_shift_rad" in fields else np.zeros(n)
    )
    voltage = _float32_to_decimal(arr["ctf/accel_kv"])
    cs = _float32_to_decimal(arr["ctf/cs_mm"])
    amp = _float32_to_decimal(arr["ctf/amp_contrast"])
    bfactor = _float32_to_decimal(arr["ctf/bfactor"]) if "ctf/bfactor" in fields else np.zeros(n)
    scale = _float32_to_decimal(arr["ctf/scale"]) if "ctf/scale" in fields else np.ones(n)
    subset = (
        arr["alignments3D/split"].astype(np.int64) + 1
        if "alignments3D/split" in fields else np.zeros(n, dtype=np.int64)
    )
    optics_group = (
        arr["ctf/exp_group_id"].astype(np.int64) + 1
        if "ctf/exp_group_id" in fields else np.ones(n, dtype=np.int64)
    )
    sign = arr["blob/sign"].astype(np.float64) if "blob/sign" in fields else np.ones(n)

    if "blob/path" in fields:
        stacks = [
            (v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)).strip().lstrip(">")
            for v in arr["blob/path"].tolist()
        ]
        index = arr["blob/idx"].astype(np.int64) if "blob/idx" in fields else np.zeros(n, np.int64)
        names = [f"{i + 1:06d}@{s}" if s else "" for i, s in zip(index.tolist(), stacks)]
    else:
        stacks = [""] * n
        index = np.zeros(n, dtype=np.int64)
        names = [""] * n
    resolved, tried = _resolve_image_paths(path, sorted(set(stacks) - {""}), image_root)
    image_paths = [resolved.get(s, "") for s in stacks]
    if "blob/shape" in fields:
        shape = arr["blob/shape"].astype(np.int64).reshape(n, -1)
        box = shape[:, -1].copy()
    else:
        box = _boxes_from_headers(image_paths)

    table = _make_table({
        "image_index": index, "image_path": image_paths, "image_name": names,
        "rot": rot, "tilt": tilt, "psi": psi, "shift_x": sx, "shift_y": sy,
        "defocus_u": defocus_u, "defocus_v": defocus_v, "defocus_angle": defocus_angle,
        "voltage": voltage, "cs": cs, "amplitude_contrast": amp, "phase_shift": phase_shift,
        "bfactor": bfactor, "ctf_scale": scale, "pixel_size": px, "box": box,
        "optics_group": optics_group, "random_subset": subset,
        "phase_flipped": np.zeros(n, dtype=bool), "ctf_premultiplied": np.zeros(n, dtype=bool),
        "image_sign": sign,
    })

    raw_cols: dict[str, Any] = {"rlnImageName": names}
    if has_pose:
        raw_cols.update({"rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi})
    if has_shift:
        raw_cols[conventions.SHIFT_COLUMNS_ANGSTROM[0]] = conventions.shift_pixels_to_angstrom(sx, px)
        raw_cols[conventions.SHIFT_COLUMNS_ANGSTROM[1]] = conventions.shift_pixels_to_angstrom(sy, px)
    raw_cols.update({
        "rlnDefocusU": defocus_u, "rlnDefocusV": defocus_v, "rlnDefocusAngle": defocus_angle,
        "rlnPhaseShift": phase_shift,
    })
    if "ctf/bfactor" in fields:
        raw_cols["rlnCtfBfactor"] = bfactor
    if "ctf/scale" in fields:
        raw_cols["rlnCtfScalefactor"] = scale
    if "alignments3D/split" in fields:
        raw_cols["rlnRandomSubset"] = subset
    raw_cols["rlnOpticsGroup"] = optics_group
    raw = pd.DataFrame(raw_cols)
    optics = _build_optics(path, raw, table)
    return Particles(
        table=table, raw=raw, optics=optics, path=path, source_format=".cs",
        relion_version=None, block="particles", image_search=tried,
    )


def _build_optics(path: Path, raw: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """RELION ≥ 3.1 optics block for cryoSPARC input (one row per ``ctf/exp_group_id``).

    Optics-level values that vary inside a group are kept per particle in ``raw`` as well.
    """
    per_col = {
        "rlnImagePixelSize": "pixel_size", "rlnImageSize": "box", "rlnVoltage": "voltage",
        "rlnSphericalAberration": "cs", "rlnAmplitudeContrast": "amplitude_contrast",
    }
    grouped = table.groupby("optics_group", sort=True)
    rows = []
    for group, sub in grouped:
        row: dict[str, Any] = {
            "rlnOpticsGroup": int(group),
            "rlnOpticsGroupName": f"opticsGroup{int(group)}",
        }
        for rln, canon in per_col.items():
            values = sub[canon].to_numpy()
            if len(np.unique(values)) > 1:
                logger.warning(
                    "%s: %s varies within cryoSPARC exposure group %s; kept per particle too",
                    path, rln, int(group) - 1,
                )
                raw[rln] = table[canon].to_numpy()
            row[rln] = values[0]
        row["rlnImageDimensionality"] = 2
        rows.append(row)
    optics = pd.DataFrame(rows)
    optics["rlnImageSize"] = optics["rlnImageSize"].astype(np.int64)
    return optics[[c for c in _CS_OPTICS_COLUMNS if c in optics.columns]]


# ==============================================================================================
# Particle images
# ==============================================================================================
class ImageStack:
    """Lazy, memory-mapped access to particle images spread over many MRC/MRCS stacks.

    Parameters
    ----------
    source
        A :class:`Particles`, or a sequence of stack paths (one per particle).
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
        source: Particles | Sequence[PathLike],
        indices: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
        *,
        names: Sequence[str] | None = None,
        cache_size: int = 64,
    ) -> None:
        self._tried: dict[str, list[str]] = {}
        self._origin: str = ""
        expected_box: int | None = None
        if isinstance(source, Particles):
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
                list(names) if names is not None
                else [f"{i + 1}@{p}" for i, p in zip(idx.tolist(), paths)]
            )
        if names is not None and isinstance(source, Particles):
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
            raise Z3InputError(
                f"particle row {r} ({names_list[r]!r}){self._origin}: image index {idx[r]} < 0"
            )
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

    # -- basic protocol --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._indices)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
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
        text = (
            f"particle row {row} (rlnImageName {self._names[row]!r}){self._origin}, "
            f"file {f}: {what}"
        )
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
            raise self._error(row, f"cannot read the MRC header ({type(exc).__name__}: {exc})",
                              "check that the file is an MRC/MRCS stack") from exc

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
            raise self._error(row, f"cannot open the stack ({type(exc).__name__}: {exc})",
                              "check that the file is a complete MRC/MRCS stack") from exc
        data = handle.data
        if data is None or data.ndim not in (2, 3):
            handle.close()
            raise self._error(
                row, "the file holds no readable image data (truncated or not an MRC stack)",
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
        for s, e in zip(starts, ends):
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
        finite = np.isfinite(out).reshape(len(rows), -1).all(axis=1)
        if not finite.all():
            r = int(rows[np.flatnonzero(~finite)[0]])
            raise self._error(
                r, "the image contains NaN or infinite pixels",
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
                problems.append(str(self._error(
                    row, f"mixed box sizes: its images are {ny}×{nx} px but the particles' box is "
                    f"{box} px", "z3 needs one box size; re-extract or rescale these particles")))
            if max_idx[fid] >= count:
                r = int(max_row[fid])
                problems.append(str(self._error(
                    r, f"image index {int(max_idx[fid]) + 1} (1-based) is past the end of the "
                    f"stack, which holds {count} image(s)",
                    "fix rlnImageName or point image_root= at the right stacks")))
        if problems:
            more = f"\n… and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise Z3InputError(
                f"{len(problems)} problem(s) with the particle images:\n"
                + "\n".join(problems[:10]) + more
            )


# ==============================================================================================
# STAR writing
# ==============================================================================================
def _format_float(value: float) -> str:
    """Shortest text that reads back as the same float64 (keeps ``1.0``, not ``1``)."""
    return repr(float(value))


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


def _apply_table(
    particles: Particles, rows: npt.NDArray[np.int64], out: pd.DataFrame, table: pd.DataFrame
) -> None:
    """Write changed canonical values of ``table`` back into the RELION columns of ``out``."""
    base = particles.table.iloc[rows].reset_index(drop=True)
    new = table.reset_index(drop=True)
    changed = [
        c for c in new.columns
        if c in base.columns and not _same_values(new[c].to_numpy(), base[c].to_numpy())
    ]
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
        use_angstrom = (
            conventions.SHIFT_COLUMNS_ANGSTROM[0] in out.columns
            or (conventions.SHIFT_COLUMNS_PIXELS[0] not in out.columns
                and particles.source_format != "relion3.0")
        )
        for axis, canon in enumerate(("shift_x", "shift_y")):
            shift = new[canon].to_numpy(dtype=np.float64)
            if use_angstrom:
                out[conventions.SHIFT_COLUMNS_ANGSTROM[axis]] = (
                    conventions.shift_pixels_to_angstrom(shift, px)
                )
            else:
                out[conventions.SHIFT_COLUMNS_PIXELS[axis]] = shift


def _column_values(name: str, values: Any, n: int) -> Any:
    arr = values.to_numpy() if isinstance(values, (pd.Series, pd.Index)) else values
    if isinstance(arr, np.ndarray) and arr.ndim == 2:
        arr = format_coefficient_column(arr)
    length = len(arr) if hasattr(arr, "__len__") and not isinstance(arr, str) else None
    if length is None:
        return [arr] * n
    if length != n:
        raise Z3InputError(
            f"write_particles_star: column {name!r} has {length} values for {n} particles"
        )
    return arr


def _validate_zernike(zernike: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in _ZERNIKE_KEYS if k not in zernike]
    if missing:
        raise Z3InputError(
            f"write_particles_star: zernike= needs the keys {', '.join(_ZERNIKE_KEYS)}; missing "
            f"{', '.join(missing)}"
        )
    out: dict[str, Any] = {
        "L1": int(zernike["L1"]),
        "L2": int(zernike["L2"]),
        "Rmax": float(zernike["Rmax"]),
        "basis": str(zernike["basis"]),
        "box": int(zernike["box"]),
    }
    if _count_terms(out["L1"], out["L2"]) == 0:
        raise Z3InputError(f"write_particles_star: invalid Zernike degrees L1={out['L1']}, L2={out['L2']}")
    for key, value in zernike.items():
        if key not in out:
            out[str(key)] = value
    return out


def write_particles_star(
    path: PathLike,
    particles: Particles,
    *,
    columns: Mapping[str, Any] | pd.DataFrame | None = None,
    zernike: Mapping[str, Any] | None = None,
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
        block: a mapping name → values (one per output row; a 2-D ``(n, 3K)`` array is formatted
        with :func:`format_coefficient_column`), or a DataFrame (matched by position).
    zernike
        When given, a ``data_zernike3d`` block (single-value, non-loop) with the keys ``L1``,
        ``L2``, ``Rmax`` (px of ``box``), ``basis`` and ``box`` (extra keys are kept).
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
    if columns is not None:
        items = (
            [(str(c), columns[c].to_numpy()) for c in columns.columns]
            if isinstance(columns, pd.DataFrame) else [(str(k), v) for k, v in columns.items()]
        )
        for name, values in items:
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
    text = starfile.writer.StarWriter(blocks, float_format=_format_float).to_string()
    if optics_out is not None:
        version = particles.relion_version or _DEFAULT_RELION_VERSION
        text = re.sub(r"^(data_(optics|particles))$", f"# version {version}\n\n\\1", text,
                      flags=re.MULTILINE)
    text = text.replace("# Created by the starfile Python package",
                        "# Written by z3lib with the starfile Python package", 1)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ==============================================================================================
# MRC maps and stacks
# ==============================================================================================
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
                    raise Z3InputError(
                        f"{p}: no readable data in the MRC file (truncated, or not an MRC file)"
                    )
                voxel = mrc.voxel_size
                vsize = (float(voxel.x), float(voxel.y), float(voxel.z))
                head_origin = (float(header.origin.x), float(header.origin.y),
                               float(header.origin.z))
                starts = (int(header.nxstart), int(header.nystart), int(header.nzstart))
                axes = (int(header.mapc), int(header.mapr), int(header.maps))
                data = np.asarray(raw)
                if data.ndim == 2:
                    data = data[None]
                if data.ndim != 3:
                    raise Z3InputError(f"{p}: expected a 3-D map, the MRC data has shape {data.shape}")
                # columns ↔ mapc, rows ↔ mapr, sections ↔ maps (1 = x, 2 = y, 3 = z)
                if sorted(axes) != [1, 2, 3]:
                    logger.warning("%s: invalid axis order mapc/mapr/maps = %s; assuming 1, 2, 3",
                                   p, axes)
                    axes = (1, 2, 3)
                labels = [axes[2], axes[1], axes[0]]  # label of data axis 0 (sections), 1, 2
                order = [labels.index(3), labels.index(2), labels.index(1)]
                data = np.ascontiguousarray(np.transpose(data, order), dtype=np.float32)
        except Z3InputError:
            raise
        except Exception as exc:
            raise Z3InputError(
                f"could not read {p} as an MRC map ({type(exc).__name__}: {exc})"
            ) from exc
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


@contextlib.contextmanager
def open_stack_writer(
    path: PathLike, n: int, box: int, pixel_size: float
) -> Iterator[npt.NDArray[np.float32]]:
    """Create an ``(n, box, box)`` float32 MRCS stack and yield its memory-mapped data.

    The caller fills the array chunk by chunk (memory stays bounded: nothing is held in RAM
    beyond the chunk being written). The file appears at ``path`` only when the block exits
    without an error (atomic rename); a failure leaves no partial stack behind.
    """
    if n < 1 or box < 1:
        raise Z3InputError(f"open_stack_writer({path}): need n >= 1 images of box >= 1, got {n}, {box}")
    with atomic_path(path) as tmp:
        mrc = mrcfile.new_mmap(tmp, shape=(int(n), int(box), int(box)), mrc_mode=2, overwrite=True)
        try:
            mrc.set_image_stack()
            mrc.voxel_size = _voxel_tuple(pixel_size)
            yield mrc.data
            mrc.update_header_stats()
            mrc.flush()
        finally:
            mrc.close()


def write_star(
    path: PathLike, blocks: Mapping[str, pd.DataFrame | Mapping[str, Any]], *,
    relion_version: str | None = _DEFAULT_RELION_VERSION,
) -> None:
    """Write STAR blocks (``name → DataFrame`` loops or ``name → dict`` single values), atomically.

    Floats are written in their shortest exact form. With ``relion_version``, a
    ``# version`` line precedes the ``optics`` and ``particles`` blocks, as RELION ≥ 3.1 writes.
    """
    text = starfile.writer.StarWriter(dict(blocks), float_format=_format_float).to_string()
    if relion_version:
        text = re.sub(r"^(data_(optics|particles))$", f"# version {relion_version}\n\n\\1", text,
                      flags=re.MULTILINE)
    text = text.replace("# Created by the starfile Python package",
                        "# Written by z3lib with the starfile Python package", 1)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


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
# Coefficients
# ==============================================================================================
def write_coefficients(path: PathLike, coefficients: npt.ArrayLike) -> None:
    """Save an ``(n, 3K)`` coefficient array as ``.npy`` (float32 or float64 kept), atomically."""
    arr = np.asarray(coefficients)
    if arr.ndim != 2:
        raise Z3InputError(f"write_coefficients({path}): expected (n, 3K), got shape {arr.shape}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def read_coefficients(path: PathLike) -> npt.NDArray[np.floating[Any]]:
    """Load an ``(n, 3K)`` coefficient array from ``.npy`` (never unpickling)."""
    p = Path(path)
    _check_readable_file(p, "coefficient file")
    _refuse_pickle(p)
    try:
        arr = np.load(p, allow_pickle=False)
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
    return [fmt % tuple(row) for row in arr.astype(np.float64).tolist()]


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
            raise Z3InputError(
                f"coefficient column: row {i} has {len(numbers)} numbers but row 0 has {len(rows[0])}"
            )
        if not numbers:
            raise Z3InputError(f"coefficient column: row {i} is empty")
        rows.append(numbers)
    if stripped:
        logger.warning("coefficient column: dropped the trailing 8 numbers of %d row(s) "
                       "(old Xmipp 3K+8 layout)", stripped)
    if not rows:
        return np.zeros((0, n_expected or 0))
    return np.asarray(rows, dtype=np.float64)


def write_zernike_file(
    path: PathLike, coefficients: npt.ArrayLike, L1: int, L2: int, rmax: float
) -> None:
    """Write a Xmipp/Flexutils Zernike coefficient text file (``z_clnm.txt`` style), atomically.

    Line 1 is ``L1 L2 Rmax``; every following line is one space-separated ``3K`` vector
    ``[c_x, c_y, c_z]`` in pixels of the box that ``Rmax`` refers to.

    Parameters
    ----------
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
                f"{p}: line {number} has {len(values)} numbers; (L1, L2) = ({l1}, {l2}) needs "
                f"3K = {3 * k}"
            )
        rows.append(values)
    if stripped:
        logger.warning("%s: dropped the trailing 8 numbers of %d line(s) (old Xmipp 3K+8 layout)",
                       p, stripped)
    coeffs = np.asarray(rows, dtype=np.float64).reshape(len(rows), 3 * k)
    return coeffs, l1, l2, rmax


# ==============================================================================================
# Xmipp metadata (.xmd)
# ==============================================================================================
#: canonical table column → Xmipp label (reference/zernike3d-family.md §7.1, §7.5): same ZYZ
#: angles, shifts in px with RELION's sign, defocus in Å, Cs in mm, voltage in kV, Q0.
_XMIPP_LABELS = (
    ("rot", "angleRot"),
    ("tilt", "angleTilt"),
    ("psi", "anglePsi"),
    ("shift_x", "shiftX"),
    ("shift_y", "shiftY"),
    ("defocus_u", "ctfDefocusU"),
    ("defocus_v", "ctfDefocusV"),
    ("defocus_angle", "ctfDefocusAngle"),
    ("cs", "ctfSphericalAberration"),
    ("voltage", "ctfVoltage"),
    ("amplitude_contrast", "ctfQ0"),
)


def write_xmipp_particles(
    path: PathLike,
    table: pd.DataFrame,
    coefficients: npt.ArrayLike,
    *,
    deformation: npt.ArrayLike | None = None,
    cost: npt.ArrayLike | None = None,
    zernike: Mapping[str, Any] | None = None,
) -> None:
    """Write particles with Zernike3D coefficients as Xmipp metadata (``.xmd``), atomically.

    One unnamed ``data_`` block with a ``loop_`` of the labels ``itemId``, ``enabled``,
    ``image`` (the ``rlnImageName`` text, ``000001@stack.mrcs``), ``angleRot/Tilt/Psi`` (deg),
    ``shiftX/Y`` (px, RELION's sign), ``ctfDefocusU/V`` (Å), ``ctfDefocusAngle`` (deg),
    ``ctfSphericalAberration`` (mm), ``ctfVoltage`` (kV), ``ctfQ0``, ``sphCoefficients`` (a quoted,
    space-separated list of the 3K coefficients ``[c_x, c_y, c_z]``), and, when given,
    ``sphDeformation`` (px RMS) and ``cost``.

    Parameters
    ----------
    table
        Canonical particle table (:attr:`Particles.table` or rows of it), in output order.
    coefficients
        ``(n, 3K)`` in px of the box that ``zernike["Rmax"]`` refers to.
    deformation, cost
        Optional ``(n,)`` values.
    zernike
        Optional ``L1``, ``L2``, ``Rmax``, ``basis``, ``box``: recorded in a comment line
        (Xmipp keeps them outside the metadata: Scipion's FlexInfo or ``z_clnm.txt``).
    """
    coeffs = np.asarray(coefficients, dtype=np.float64)
    n = len(table)
    if coeffs.ndim != 2 or coeffs.shape[0] != n:
        raise Z3InputError(
            f"write_xmipp_particles({path}): coefficients of shape {coeffs.shape} for {n} particles"
        )
    columns: dict[str, list[str]] = {
        "itemId": [str(i + 1) for i in range(n)],
        "enabled": ["1"] * n,
        "image": [str(v) for v in table["image_name"].tolist()],
    }
    for canon, label in _XMIPP_LABELS:
        columns[label] = [_format_float(v) for v in table[canon].to_numpy(dtype=np.float64)]
    columns["sphCoefficients"] = ["'" + " ".join(repr(v) for v in row) + "'" for row in coeffs.tolist()]
    for label, values in (("sphDeformation", deformation), ("cost", cost)):
        if values is not None:
            arr = np.asarray(values, dtype=np.float64).reshape(-1)
            if len(arr) != n:
                raise Z3InputError(f"write_xmipp_particles({path}): {label} has {len(arr)} values for {n} particles")
            columns[label] = [_format_float(v) for v in arr]
    bad = [v for v in columns["image"] if not v or any(ch.isspace() for ch in v)]
    if bad:
        raise Z3InputError(f"write_xmipp_particles({path}): image names must be non-empty without spaces, got {bad[0]!r}")
    lines = ["# XMIPP_STAR_1 *", "# Written by z3lib"]
    if zernike is not None:
        z = _validate_zernike(zernike)
        lines.append(f"# Zernike3D L1 {z['L1']} L2 {z['L2']} Rmax {_format_float(z['Rmax'])} px "
                     f"basis {z['basis']} box {z['box']} px; sphCoefficients are [c_x c_y c_z] in px of that box")
    lines += ["#", "data_", "loop_"]
    lines += [f" _{label}" for label in columns]
    lines += [" ".join(row) for row in zip(*columns.values(), strict=True)]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


# ==============================================================================================
# Atomic models
# ==============================================================================================
_TWO_LETTER_IONS = {
    "CA", "MG", "ZN", "NA", "CL", "FE", "MN", "CU", "CO", "NI", "CD", "HG", "BR", "SE", "LI",
}


def _guess_element(atom_name: str, residue_name: str) -> str:
    """Element from a PDB atom name when the file has no element column (CHARMM-style PDBs)."""
    name = atom_name.strip().upper()
    res = residue_name.strip().upper()
    if name == res and name in _TWO_LETTER_IONS:
        return name.capitalize()
    letters = name.lstrip("0123456789")
    first = letters[:1]
    if first in ("H", "C", "N", "O", "S", "P"):
        return first
    return first or "X"


def _pdb_has_element_columns(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("ATOM  ", "HETATM")) and line[76:78].strip():
                    return True
    except OSError:
        return True
    return False


@dataclass
class AtomicModel:
    """Atoms of the first model of a PDB/mmCIF file, in file order.

    Attributes
    ----------
    coords
        ``(N, 3)`` float64 positions ``(x, y, z)`` in Å.
    elements
        ``(N,)`` element symbols (``"C"``, ``"Ca"``…).
    atom_names, residue_names, chain_ids, segment_ids
        ``(N,)`` str.
    residue_numbers
        ``(N,)`` int.
    bfactors
        ``(N,)`` float64 (Å²).
    path
        The file read.
    """

    coords: npt.NDArray[np.float64]
    elements: npt.NDArray[np.str_]
    atom_names: npt.NDArray[np.str_]
    residue_names: npt.NDArray[np.str_]
    chain_ids: npt.NDArray[np.str_]
    segment_ids: npt.NDArray[np.str_]
    residue_numbers: npt.NDArray[np.int64]
    bfactors: npt.NDArray[np.float64]
    path: Path
    _structure: Any = field(repr=False, compare=False, default=None)

    def __len__(self) -> int:
        return len(self.coords)


def read_model(path: PathLike) -> AtomicModel:
    """Read an atomic model (PDB or mmCIF, by extension or content) with gemmi.

    Only the first model is read; every atom is kept (hydrogens, alternate locations) in file
    order. For PDB files without element columns (77–78), elements are guessed from the atom
    names (first letter; ions whose residue name equals the atom name keep two letters), because
    gemmi's guess mistakes left-aligned CHARMM names (``CA`` → calcium, ``HG1`` → mercury).

    Raises
    ------
    Z3InputError
        Missing, unreadable or empty file.
    """
    p = Path(path)
    _check_readable_file(p, "atomic model")
    if p.stat().st_size == 0:
        raise Z3InputError(f"{p} is empty; expected a PDB or mmCIF atomic model")
    try:
        st = gemmi.read_structure(str(p), format=gemmi.CoorFormat.Detect)
    except Exception as exc:
        raise Z3InputError(f"could not read {p} as PDB or mmCIF ({type(exc).__name__}: {exc})") from exc
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise Z3InputError(f"{p} holds no atoms; expected a PDB or mmCIF atomic model")
    for extra in range(len(st) - 1, 0, -1):
        del st[extra]
    is_pdb = st.input_format == gemmi.CoorFormat.Pdb
    guess = is_pdb and not _pdb_has_element_columns(p)
    coords, elements, names, resn, chains, segs, resi, bfac = [], [], [], [], [], [], [], []
    for chain in st[0]:
        for residue in chain:
            for atom in residue:
                if guess:
                    atom.element = gemmi.Element(_guess_element(atom.name, residue.name))
                pos = atom.pos
                coords.append((pos.x, pos.y, pos.z))
                elements.append(atom.element.name)
                names.append(atom.name)
                resn.append(residue.name)
                chains.append(chain.name)
                segs.append(residue.segment)
                resi.append(residue.seqid.num)
                bfac.append(atom.b_iso)
    if guess:
        logger.info("%s: no element columns; elements guessed from the atom names", p)
    return AtomicModel(
        coords=np.asarray(coords, dtype=np.float64).reshape(-1, 3),
        elements=np.asarray(elements, dtype=str),
        atom_names=np.asarray(names, dtype=str),
        residue_names=np.asarray(resn, dtype=str),
        chain_ids=np.asarray(chains, dtype=str),
        segment_ids=np.asarray(segs, dtype=str),
        residue_numbers=np.asarray(resi, dtype=np.int64),
        bfactors=np.asarray(bfac, dtype=np.float64),
        path=p,
        _structure=st,
    )


def write_model_pdb(path: PathLike, model: AtomicModel, coords: npt.ArrayLike) -> None:
    """Write ``model`` as PDB with new coordinates, atomically.

    Parameters
    ----------
    path
        Output ``.pdb``.
    model
        What :func:`read_model` returned (topology, names, B-factors are kept).
    coords
        ``(N, 3)`` new positions in Å, in the order of ``model.coords``.
    """
    xyz = np.asarray(coords, dtype=np.float64)
    if xyz.shape != model.coords.shape:
        raise Z3InputError(
            f"write_model_pdb({path}): coordinates of shape {xyz.shape}, the model has "
            f"{model.coords.shape}"
        )
    if not np.isfinite(xyz).all():
        raise Z3InputError(f"write_model_pdb({path}): coordinates contain NaN or inf")
    if np.abs(xyz).max(initial=0.0) >= 9999.9995 or xyz.min(initial=0.0) <= -999.9995:
        raise Z3InputError(
            f"write_model_pdb({path}): coordinates outside the PDB range (-999.999…9999.999 Å); "
            "write mmCIF instead"
        )
    if model._structure is None:
        raise Z3InputError("write_model_pdb: the model carries no structure (use read_model)")
    st = model._structure.clone()
    i = 0
    for chain in st[0]:
        for residue in chain:
            for atom in residue:
                atom.pos = gemmi.Position(*xyz[i])
                i += 1
    with atomic_path(path) as tmp:
        tmp.write_text(st.make_pdb_string())
