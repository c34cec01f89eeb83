"""cryoSPARC ``.cs`` particle metadata (a numpy structured array, read with ``allow_pickle=False``).

:func:`_read_cs` makes of a ``.cs`` file what :func:`z3lib.io.read_particles` needs: the canonical
table, a RELION-style particle block (``raw``) and a RELION ≥ 3.1 optics block (one group per
``ctf/exp_group_id``). Poses (``alignments3D/pose``, rotation vectors) become RELION ZYZ Euler
angles in degrees, shifts stay pixels of the particle images, float32 typed-in quantities are read
through their shortest decimal (2.95 Å, not 2.9500000477).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pandas as pd

from z3lib.io._common import (
    _PICKLE_MESSAGE,
    PathLike,
    Z3InputError,
    _float32_to_decimal,
    _make_table,
    _missing_pixel_size_error,
    atomic_path,
    logger,
)
from z3lib.io.stack import _boxes_from_headers, _resolve_image_paths

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
#: CTF fields a ``.cs`` file must hold (often only in the job's passthrough file).
_CS_CTF_FIELDS = ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")

FloatArray = npt.NDArray[np.float64]


class CsParticles(NamedTuple):
    """What :func:`_read_cs` read.

    :func:`z3lib.io.read_particles` makes it a :class:`z3lib.io.Particles` (``source_format=".cs"``,
    block ``"particles"``).
    """

    table: pd.DataFrame
    raw: pd.DataFrame
    optics: pd.DataFrame
    image_search: dict[str, list[str]]


def _read_cs(path: Path, *, pixel_size: float | None, image_root: Path | None) -> CsParticles:
    """Read a cryoSPARC ``.cs`` file (see :func:`z3lib.io.read_particles` for the arguments)."""
    arr = _load_cs(path)
    n = len(arr)
    fields = set(arr.dtype.names or ())
    _check_cs_ctf_fields(path, fields)
    px, blob_px, align_px = _cs_pixel_sizes(path, arr, fields, pixel_size)
    angles = _cs_angles(arr, fields)
    shifts = _cs_shifts(path, arr, fields, blob_px, align_px)
    values = _cs_ctf_and_groups(arr, fields)
    index, names, image_paths, box, tried = _cs_images(path, arr, fields, image_root)
    rot, tilt, psi = angles if angles is not None else (np.full(n, np.nan),) * 3
    sx, sy = shifts if shifts is not None else (np.zeros(n), np.zeros(n))
    table = _make_table(
        {
            "image_index": index,
            "image_path": image_paths,
            "image_name": names,
            "rot": rot,
            "tilt": tilt,
            "psi": psi,
            "shift_x": sx,
            "shift_y": sy,
            **values,
            "pixel_size": px,
            "box": box,
            "phase_flipped": np.zeros(n, dtype=bool),
            "ctf_premultiplied": np.zeros(n, dtype=bool),
        }
    )
    raw = _cs_raw_block(names, fields, angles, shifts, px, values)
    optics = _build_optics(path, raw, table)
    return CsParticles(table=table, raw=raw, optics=optics, image_search=tried)


def _load_cs(path: Path) -> npt.NDArray[Any]:
    """Load the ``.cs`` structured array, refused when it needs unpickling, is not 1-D or is empty."""
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
    if len(arr) == 0:
        raise Z3InputError(f"{path}: the .cs file holds no particles")
    return arr


def _check_cs_ctf_fields(path: Path, fields: set[str]) -> None:
    missing = [f for f in _CS_CTF_FIELDS if f not in fields]
    if missing:
        present = [f for f in _CS_CTF_FIELDS if f in fields]
        raise Z3InputError(
            f"{path}: missing CTF field(s) {', '.join(missing)} (present: "
            f"{', '.join(present) if present else 'none'}); cryoSPARC often keeps the CTF in "
            "the job's passthrough file (…_passthrough_particles.cs): export the particles from "
            "cryoSPARC (or with csparc2star) so that blob/*, ctf/* and alignments3D/* are in one file"
        )


def _cs_pixel_sizes(
    path: Path, arr: npt.NDArray[Any], fields: set[str], pixel_size: float | None
) -> tuple[FloatArray, FloatArray | None, FloatArray | None]:
    """Return the per-particle pixel size (Å) and the two pixel-size fields as read.

    Pixel size: override > ``blob/psize_A`` > ``alignments3D/psize_A``; the two fields as read
    (None when absent) serve for rescaling the shifts.
    """
    n = len(arr)
    blob_px = _float32_to_decimal(arr["blob/psize_A"]) if "blob/psize_A" in fields else None
    align_px = _float32_to_decimal(arr["alignments3D/psize_A"]) if "alignments3D/psize_A" in fields else None
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
    return px, blob_px, align_px


def _cs_angles(arr: npt.NDArray[Any], fields: set[str]) -> tuple[FloatArray, FloatArray, FloatArray] | None:
    """RELION ZYZ Euler angles (degrees) from ``alignments3D/pose``, or None without poses."""
    if "alignments3D/pose" not in fields:
        return None
    from z3lib import conventions  # when needed: z3lib.io imports no other z3lib module

    matrices = conventions.cryosparc_pose_to_relion_matrix(arr["alignments3D/pose"].astype(np.float64))
    rot, tilt, psi = conventions.matrix_to_euler(matrices)
    return rot, tilt, psi


def _cs_shifts(
    path: Path,
    arr: npt.NDArray[Any],
    fields: set[str],
    blob_px: FloatArray | None,
    align_px: FloatArray | None,
) -> tuple[FloatArray, FloatArray] | None:
    """Return the shifts ``(x, y)`` in pixels of the particle images, or None without shifts.

    From ``alignments3D/shift``, rescaled when the alignment's pixel size differs from the images'.
    """
    if "alignments3D/shift" not in fields:
        return None
    n = len(arr)
    shift = arr["alignments3D/shift"].astype(np.float64).reshape(n, 2)
    if blob_px is not None and align_px is not None:
        ratio = align_px / blob_px
        if np.any(np.abs(ratio - 1.0) > 1e-4):
            logger.warning(
                "%s: alignments3D/psize_A differs from blob/psize_A; shifts rescaled to pixels of the particle images",
                path,
            )
            shift = shift * ratio[:, None]
    return shift[:, 0].copy(), shift[:, 1].copy()


def _cs_ctf_and_groups(arr: npt.NDArray[Any], fields: set[str]) -> dict[str, npt.NDArray[Any]]:
    """Return the CTF (Å, degrees, kV, mm), half sets, optics groups and image sign, by canonical column."""
    n = len(arr)
    return {
        "defocus_u": _float32_to_decimal(arr["ctf/df1_A"]),
        "defocus_v": _float32_to_decimal(arr["ctf/df2_A"]),
        "defocus_angle": np.rad2deg(arr["ctf/df_angle_rad"].astype(np.float64)),
        "phase_shift": (
            np.rad2deg(arr["ctf/phase_shift_rad"].astype(np.float64))
            if "ctf/phase_shift_rad" in fields
            else np.zeros(n)
        ),
        "voltage": _float32_to_decimal(arr["ctf/accel_kv"]),
        "cs": _float32_to_decimal(arr["ctf/cs_mm"]),
        "amplitude_contrast": _float32_to_decimal(arr["ctf/amp_contrast"]),
        "bfactor": _float32_to_decimal(arr["ctf/bfactor"]) if "ctf/bfactor" in fields else np.zeros(n),
        "ctf_scale": _float32_to_decimal(arr["ctf/scale"]) if "ctf/scale" in fields else np.ones(n),
        "random_subset": (
            arr["alignments3D/split"].astype(np.int64) + 1
            if "alignments3D/split" in fields
            else np.zeros(n, dtype=np.int64)
        ),
        "optics_group": (
            arr["ctf/exp_group_id"].astype(np.int64) + 1 if "ctf/exp_group_id" in fields else np.ones(n, dtype=np.int64)
        ),
        "image_sign": arr["blob/sign"].astype(np.float64) if "blob/sign" in fields else np.ones(n),
    }


def _cs_images(
    path: Path, arr: npt.NDArray[Any], fields: set[str], image_root: Path | None
) -> tuple[npt.NDArray[np.int64], list[str], list[str], npt.NDArray[np.int64], dict[str, list[str]]]:
    """Return the image indices, names, stack paths, boxes and tried places of the particles.

    0-based image indices, ``N@stack`` names, absolute stack paths, boxes (px) and the places tried
    for each stack, from ``blob/path``, ``blob/idx`` and ``blob/shape``.
    """
    n = len(arr)
    if "blob/path" in fields:
        stacks = [
            (v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)).strip().lstrip(">")
            for v in arr["blob/path"].tolist()
        ]
        index = arr["blob/idx"].astype(np.int64) if "blob/idx" in fields else np.zeros(n, np.int64)
        names = [f"{i + 1:06d}@{s}" if s else "" for i, s in zip(index.tolist(), stacks, strict=True)]
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
    return index, names, image_paths, box, tried


def _cs_raw_block(
    names: list[str],
    fields: set[str],
    angles: tuple[FloatArray, FloatArray, FloatArray] | None,
    shifts: tuple[FloatArray, FloatArray] | None,
    px: FloatArray,
    values: dict[str, npt.NDArray[Any]],
) -> pd.DataFrame:
    """Build the RELION-style particle block of ``.cs`` input.

    The columns the ``.cs`` has values for (shifts as ``rlnOriginX/YAngst`` = px × pixel size).
    """
    from z3lib import conventions  # when needed: z3lib.io imports no other z3lib module

    raw_cols: dict[str, Any] = {"rlnImageName": names}
    if angles is not None:
        raw_cols.update({"rlnAngleRot": angles[0], "rlnAngleTilt": angles[1], "rlnAnglePsi": angles[2]})
    if shifts is not None:
        raw_cols[conventions.SHIFT_COLUMNS_ANGSTROM[0]] = conventions.shift_pixels_to_angstrom(shifts[0], px)
        raw_cols[conventions.SHIFT_COLUMNS_ANGSTROM[1]] = conventions.shift_pixels_to_angstrom(shifts[1], px)
    raw_cols.update(
        {
            "rlnDefocusU": values["defocus_u"],
            "rlnDefocusV": values["defocus_v"],
            "rlnDefocusAngle": values["defocus_angle"],
            "rlnPhaseShift": values["phase_shift"],
        }
    )
    if "ctf/bfactor" in fields:
        raw_cols["rlnCtfBfactor"] = values["bfactor"]
    if "ctf/scale" in fields:
        raw_cols["rlnCtfScalefactor"] = values["ctf_scale"]
    if "alignments3D/split" in fields:
        raw_cols["rlnRandomSubset"] = values["random_subset"]
    raw_cols["rlnOpticsGroup"] = values["optics_group"]
    return pd.DataFrame(raw_cols)


def _build_optics(path: Path, raw: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """RELION ≥ 3.1 optics block for cryoSPARC input (one row per ``ctf/exp_group_id``).

    Optics-level values that vary inside a group are kept per particle in ``raw`` as well.
    """
    per_col = {
        "rlnImagePixelSize": "pixel_size",
        "rlnImageSize": "box",
        "rlnVoltage": "voltage",
        "rlnSphericalAberration": "cs",
        "rlnAmplitudeContrast": "amplitude_contrast",
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
                    path,
                    rln,
                    int(group) - 1,
                )
                raw[rln] = table[canon].to_numpy()
            row[rln] = values[0]
        row["rlnImageDimensionality"] = 2
        rows.append(row)
    optics = pd.DataFrame(rows)
    optics["rlnImageSize"] = optics["rlnImageSize"].astype(np.int64)
    return optics[[c for c in _CS_OPTICS_COLUMNS if c in optics.columns]]


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _cs_uids(names: list[str], index: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """Return stable 64-bit unique ids from each particle's image identity (cryoSPARC's ``uid``).

    cryoSPARC draws its uids at random; here the same particle gets the same uid in every export,
    so two selections of one run can be joined or compared in cryoSPARC. Rows that name the same
    image (or none) are told apart by their row number.
    """

    def hashed(keys: list[str]) -> npt.NDArray[np.uint64]:
        digests = b"".join(hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys)
        return np.frombuffer(digests, dtype="<u8").astype(np.uint64)

    keys = [f"{name}|{idx}" for name, idx in zip(names, index.tolist(), strict=True)]
    out = hashed(keys)
    if len(np.unique(out)) != len(out):
        out = hashed([f"{key}|{row}" for row, key in enumerate(keys)])
    return out


def _cs_from_table(table: pd.DataFrame) -> npt.NDArray[Any]:
    """Build a ``.cs`` structured array (cryoSPARC's field names, types and layout) from a canonical table."""
    from z3lib import conventions  # when needed: z3lib.io imports no other z3lib module

    n = len(table)
    names = [str(v) for v in table["image_name"].tolist()]
    stacks = [v.split("@", 1)[1] if "@" in v else "" for v in names]
    index = table["image_index"].to_numpy(dtype=np.int64)
    has_split = bool((table["random_subset"].to_numpy() > 0).any())
    angles = table[["rot", "tilt", "psi"]].to_numpy(dtype=np.float64)
    has_pose = bool(n and np.isfinite(angles).all())
    width = max([1, *(len(s.encode()) for s in stacks)])
    fields: list[tuple[Any, ...]] = [
        ("uid", "<u8"),
        ("blob/path", f"S{width}"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("blob/sign", "<f4"),
        ("ctf/type", "S9"),
        ("ctf/exp_group_id", "<u4"),
        *((name, "<f4") for name in _CS_CTF_WRITTEN),
        *([("alignments3D/split", "<u4")] if has_split else []),
        *(
            [("alignments3D/shift", "<f4", (2,)), ("alignments3D/pose", "<f4", (3,)), ("alignments3D/psize_A", "<f4")]
            if has_pose
            else []
        ),
    ]
    arr = np.zeros(n, dtype=np.dtype(fields))
    arr["uid"] = _cs_uids(names, index)
    arr["blob/path"] = [s.encode() for s in stacks]
    arr["blob/idx"] = index
    box = table["box"].to_numpy(dtype=np.int64)
    arr["blob/shape"] = np.stack([box, box], axis=1)
    arr["blob/psize_A"] = table["pixel_size"].to_numpy(dtype=np.float64)
    arr["blob/sign"] = table["image_sign"].to_numpy(dtype=np.float64)
    arr["ctf/type"] = b"imported"
    arr["ctf/exp_group_id"] = table["optics_group"].to_numpy(dtype=np.int64) - 1
    for name, value in _cs_ctf_values(table).items():
        arr[name] = value
    if has_split:
        arr["alignments3D/split"] = np.clip(table["random_subset"].to_numpy(dtype=np.int64) - 1, 0, 1)
    if has_pose:
        arr["alignments3D/shift"] = table[["shift_x", "shift_y"]].to_numpy(dtype=np.float64)
        matrices = conventions.euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
        arr["alignments3D/pose"] = conventions.relion_matrix_to_cryosparc_pose(matrices)
        arr["alignments3D/psize_A"] = table["pixel_size"].to_numpy(dtype=np.float64)
    return arr


#: CTF fields written from the canonical table (cryoSPARC's order).
_CS_CTF_WRITTEN = (
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/phase_shift_rad",
    "ctf/scale",
    "ctf/bfactor",
)


def _cs_ctf_values(table: pd.DataFrame) -> dict[str, npt.NDArray[np.float64]]:
    """Return the ``ctf/*`` values (Å, radians, kV, mm) of a canonical table, by ``.cs`` field."""

    def col(name: str) -> npt.NDArray[np.float64]:
        return np.asarray(table[name].to_numpy(dtype=np.float64), dtype=np.float64)

    return {
        "ctf/accel_kv": col("voltage"),
        "ctf/cs_mm": col("cs"),
        "ctf/amp_contrast": col("amplitude_contrast"),
        "ctf/df1_A": col("defocus_u"),
        "ctf/df2_A": col("defocus_v"),
        "ctf/df_angle_rad": np.deg2rad(col("defocus_angle")),
        "ctf/phase_shift_rad": np.deg2rad(col("phase_shift")),
        "ctf/scale": col("ctf_scale"),
        "ctf/bfactor": col("bfactor"),
    }


def _overwrite_changed(out: npt.NDArray[Any], table: pd.DataFrame, source_table: pd.DataFrame) -> None:
    """Write the table's poses, shifts and defoci into ``out`` where they differ from the source's.

    ``source_table`` is what the source's rows read as; unchanged values keep their stored bits.
    """
    from z3lib import conventions  # when needed: z3lib.io imports no other z3lib module

    names = set(out.dtype.names or ())
    new, old = table.reset_index(drop=True), source_table.reset_index(drop=True)
    angles = new[["rot", "tilt", "psi"]].to_numpy(dtype=np.float64)
    if "alignments3D/pose" in names and np.isfinite(angles).all():
        a_new = conventions.euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
        a_old = conventions.euler_to_matrix(*(old[c].to_numpy(dtype=np.float64) for c in ("rot", "tilt", "psi")))
        moved = np.abs(a_new - a_old).max(axis=(1, 2)) > 1e-6
        out["alignments3D/pose"][moved] = conventions.relion_matrix_to_cryosparc_pose(a_new[moved])
    if "alignments3D/shift" in names:
        xy_new = new[["shift_x", "shift_y"]].to_numpy(dtype=np.float64)
        xy_old = old[["shift_x", "shift_y"]].to_numpy(dtype=np.float64)
        moved = np.abs(xy_new - xy_old).max(axis=1) > 1e-4
        scale = np.ones(len(out))
        if "alignments3D/psize_A" in names and "blob/psize_A" in names:  # stored in alignment pixels
            scale = out["blob/psize_A"].astype(np.float64) / out["alignments3D/psize_A"].astype(np.float64)
        out["alignments3D/shift"][moved] = xy_new[moved] * scale[moved, None]
    for field_name, canon, convert in (
        ("ctf/df1_A", "defocus_u", 1.0),
        ("ctf/df2_A", "defocus_v", 1.0),
        ("ctf/df_angle_rad", "defocus_angle", np.pi / 180.0),
    ):
        moved = np.abs(new[canon].to_numpy(dtype=np.float64) - old[canon].to_numpy(dtype=np.float64)) > 1e-3
        out[field_name][moved] = new[canon].to_numpy(dtype=np.float64)[moved] * convert


def write_cs(
    path: PathLike,
    table: pd.DataFrame,
    *,
    source: PathLike | None = None,
    source_rows: npt.ArrayLike | None = None,
) -> None:
    """Write particles as a cryoSPARC ``.cs`` file (a numpy structured array, written atomically).

    Parameters
    ----------
    path
        Output ``.cs`` file.
    table
        A canonical table like :attr:`Particles.table` (``n`` rows): poses (RELION ZYZ degrees)
        become ``alignments3D/pose`` (axis-angle radians of ``Aᵀ``), shifts stay pixels with
        RELION's sign, defoci stay Å, angles become radians, optics groups ``ctf/exp_group_id``
        (0-based), half sets ``alignments3D/split`` (0/1; only when the table has them),
        ``image_sign`` is ``blob/sign``, and ``blob/path``/``blob/idx`` name the image as the
        table's ``image_name`` does (``N@stack``: the stack's path as written, 0-based index).
        ``uid`` is a stable hash of the image's identity.
    source
        The cryoSPARC ``.cs`` the particles were read from: its rows ``source_rows`` are copied
        with every field (cryoSPARC's own uids, passthrough fields and all), and only the poses,
        shifts and defoci the table changed are written over them.
    source_rows
        ``(n,)`` 0-based rows of ``source``, one per table row (required with ``source``).

    Raises
    ------
    Z3InputError
        An unreadable source, rows outside it, or a source whose images are not the table's.
    """
    if source is None:
        arr = _cs_from_table(table)
    else:
        src = Path(source)
        full = _load_cs(src)
        if source_rows is None:
            raise Z3InputError(f"write_cs: source_rows are needed to copy rows of {src}")
        rows = np.asarray(source_rows, dtype=np.int64)
        if len(rows) != len(table) or (len(rows) and (rows.min() < 0 or rows.max() >= len(full))):
            raise Z3InputError(f"write_cs: {len(rows)} source rows for {len(table)} particles, {src} has {len(full)}")
        source_read = _read_cs(src, pixel_size=None, image_root=None).table.iloc[rows]
        if "blob/idx" in (full.dtype.names or ()) and not np.array_equal(
            source_read["image_index"].to_numpy(), table["image_index"].to_numpy()
        ):
            raise Z3InputError(
                f"write_cs: the particles are not rows of {src} in the order given (their image "
                "indices differ); export from the run whose input this .cs was"
            )
        arr = full[rows].copy()
        _overwrite_changed(arr, table, source_read)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, arr)
