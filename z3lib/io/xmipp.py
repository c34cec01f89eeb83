"""Xmipp metadata (``.xmd``): particles with their Zernike3D coefficients, as Xmipp/Flexutils read them.

Same ZYZ angles (degrees) and RELION's shift sign (px) as z3; defocus in Å, Cs in mm, voltage in
kV; the coefficients ``[c_x, c_y, c_z]`` in px of the box that ``Rmax`` refers to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from z3lib.io._common import PathLike, Z3InputError, _format_float, atomic_path
from z3lib.io.coefficients import _validate_zernike
from z3lib.zernike import ZernikeSpec

#: canonical table column → Xmipp label (docs/algorithms.md §3): same ZYZ
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
    zernike: ZernikeSpec | Mapping[str, Any] | None = None,
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
    path
        Destination ``.xmd`` file.
    table
        Canonical particle table (:attr:`Particles.table` or rows of it), in output order.
    coefficients
        ``(n, 3K)`` in px of the box of ``zernike`` (``Rmax = box / 2``).
    deformation, cost
        Optional ``(n,)`` values.
    zernike
        Optional :class:`~z3lib.zernike.ZernikeSpec` (or a mapping with ``L1``, ``L2``, ``Rmax``,
        ``basis``, ``box``): recorded in a comment line
        (Xmipp keeps them outside the metadata: Scipion's FlexInfo or ``z_clnm.txt``).
    """
    coeffs = np.asarray(coefficients, dtype=np.float64)
    n = len(table)
    if coeffs.ndim != 2 or coeffs.shape[0] != n:
        raise Z3InputError(f"write_xmipp_particles({path}): coefficients of shape {coeffs.shape} for {n} particles")
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
        raise Z3InputError(
            f"write_xmipp_particles({path}): image names must be non-empty without spaces, got {bad[0]!r}"
        )
    lines = ["# XMIPP_STAR_1 *", "# Written by z3lib"]
    if zernike is not None:
        z = _validate_zernike(zernike)
        lines.append(
            f"# Zernike3D L1 {z['L1']} L2 {z['L2']} Rmax {_format_float(z['Rmax'])} px "
            f"basis {z['basis']} box {z['box']} px; sphCoefficients are [c_x c_y c_z] in px of that box"
        )
    lines += ["#", "data_", "loop_"]
    lines += [f" _{label}" for label in columns]
    lines += [" ".join(row) for row in zip(*columns.values(), strict=True)]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
