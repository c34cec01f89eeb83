"""Every unit, angle, sign and axis convention of z3, and the conversions between them.

This module is the one place where conventions live (docs/conventions.md). Other modules import from
here; nothing else converts units or builds rotation matrices.

Summary of the law
------------------
* Volumes are ``[z, y, x]``, images ``[y, x]``, stacks ``[n, y, x]``. The centre of an N-box is
  index ``N // 2`` on every axis. Point clouds are ``(N, 3)`` arrays of ``(x, y, z)`` in pixels,
  relative to that centre.
* Rotations are RELION ZYZ Euler angles (rot φ, tilt θ, psi ψ) in degrees;
  ``A = R_z(ψ) R_y(θ) R_z(φ)`` maps reference coordinates to projection coordinates. A map point
  ``p`` lands at image position ``(A p)_xy - s + N // 2`` where ``s`` is the origin shift in pixels.
  The projection runs along the rotated z axis.
* Shifts in files: RELION ≥ 3.1 ``rlnOriginXAngst`` (Å), RELION 3.0 ``rlnOriginX`` (px).
* CTF: RELION's model; CTF(s → 0) = +Q0.
* Pixel size comes from the metadata, never from particle-stack MRC headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from z3lib.arrays import is_tensor

if TYPE_CHECKING:
    import torch

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")

#: Relativistic electron-wavelength constants (Å, V): λ = 12.2643247 / sqrt(V (1 + 0.978466e-6 V)).
WAVELENGTH_NUMERATOR = 12.2643247
WAVELENGTH_RELATIVISTIC = 0.978466e-6


# ----------------------------------------------------------------------------------------------
# Boxes and centres
# ----------------------------------------------------------------------------------------------
def box_center(n: int) -> int:
    """Index of the centre of an ``n``-pixel axis: ``n // 2`` (RELION/Xmipp)."""
    return int(n) // 2


def default_rmax(box: int) -> float:
    """Zernike3D ``Rmax`` of a box in pixels: ``box / 2`` (Scipion/Flexutils convention)."""
    return 0.5 * float(box)


# ----------------------------------------------------------------------------------------------
# Euler angles
# ----------------------------------------------------------------------------------------------
def euler_to_matrix(rot: Any, tilt: Any, psi: Any) -> Any:
    """RELION ZYZ Euler angles to rotation matrices ``A = R_z(psi) R_y(tilt) R_z(rot)``.

    Parameters
    ----------
    rot, tilt, psi
        Angles in **degrees**; numbers, numpy arrays or torch tensors, broadcast together to a
        common shape ``S``. Torch inputs keep device, dtype and autograd.

    Returns
    -------
    ``S + (3, 3)`` matrices (numpy float64 for numpy/scalar input, torch for torch input) that
    left-multiply ``(x, y, z)`` column vectors and map reference coordinates to projection
    coordinates. Rows: ``[cψcθcφ−sψsφ, cψcθsφ+sψcφ, −cψsθ]``,
    ``[−sψcθcφ−cψsφ, −sψcθsφ+cψcφ, sψsθ]``, ``[sθcφ, sθsφ, cθ]``.
    """
    if any(is_tensor(a) for a in (rot, tilt, psi)):
        import torch

        ref = next(a for a in (rot, tilt, psi) if is_tensor(a))
        dtype = ref.dtype if ref.is_floating_point() else torch.float64
        r, t, p = (torch.as_tensor(a, dtype=dtype, device=ref.device) for a in (rot, tilt, psi))
        r, t, p = torch.broadcast_tensors(  # type: ignore[no-untyped-call]
            torch.deg2rad(r), torch.deg2rad(t), torch.deg2rad(p)
        )
        ca, sa, cb, sb, cg, sg = (torch.cos(r), torch.sin(r), torch.cos(t), torch.sin(t), torch.cos(p), torch.sin(p))
        rows = [
            torch.stack([cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb], dim=-1),
            torch.stack([-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb], dim=-1),
            torch.stack([sb * ca, sb * sa, cb], dim=-1),
        ]
        return torch.stack(rows, dim=-2)
    rn, tn, pn = np.broadcast_arrays(*(np.deg2rad(np.asarray(a, dtype=np.float64)) for a in (rot, tilt, psi)))
    ca, sa, cb, sb, cg, sg = np.cos(rn), np.sin(rn), np.cos(tn), np.sin(tn), np.cos(pn), np.sin(pn)
    out = np.empty(rn.shape + (3, 3), dtype=np.float64)
    out[..., 0, 0] = cg * cb * ca - sg * sa
    out[..., 0, 1] = cg * cb * sa + sg * ca
    out[..., 0, 2] = -cg * sb
    out[..., 1, 0] = -sg * cb * ca - cg * sa
    out[..., 1, 1] = -sg * cb * sa + cg * ca
    out[..., 1, 2] = sg * sb
    out[..., 2, 0] = sb * ca
    out[..., 2, 1] = sb * sa
    out[..., 2, 2] = cb
    return out


def matrix_to_euler(matrix: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotation matrices to RELION ZYZ Euler angles (the inverse of :func:`euler_to_matrix`).

    Parameters
    ----------
    matrix
        ``(..., 3, 3)`` rotation matrices (RELION's ``A``).

    Returns
    -------
    ``(rot, tilt, psi)`` in degrees, each of shape ``(...)``; tilt in ``[0, 180]``, rot and psi in
    ``(-180, 180]``. At the gimbal poles (tilt 0 or 180) only ``rot ± psi`` is defined; rot is set
    to 0 there and psi carries the whole in-plane angle.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_euler expects (..., 3, 3) matrices, got shape {a.shape}")
    sin_tilt = np.hypot(a[..., 0, 2], a[..., 1, 2])
    tilt = np.arctan2(sin_tilt, a[..., 2, 2])
    rot = np.arctan2(a[..., 2, 1], a[..., 2, 0])
    psi = np.arctan2(a[..., 1, 2], -a[..., 0, 2])
    pole = sin_tilt < 1e-9
    north = pole & (a[..., 2, 2] > 0)
    south = pole & (a[..., 2, 2] <= 0)
    rot = np.where(pole, 0.0, rot)
    psi = np.where(north, np.arctan2(a[..., 0, 1], a[..., 0, 0]), psi)
    psi = np.where(south, np.arctan2(a[..., 0, 1], -a[..., 0, 0]), psi)
    tilt = np.where(north, 0.0, np.where(south, np.pi, tilt))
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def rotvec_to_matrix(rotvec: npt.ArrayLike) -> np.ndarray:
    """Axis-angle (Rodrigues) vectors to rotation matrices, ``R = exp([v]_x)``.

    Parameters
    ----------
    rotvec
        ``(..., 3)`` axis × angle (radians), as stored in cryoSPARC ``alignments3D/pose``.

    Returns
    -------
    ``(..., 3, 3)`` float64 matrices acting on column vectors.
    """
    v = np.asarray(rotvec, dtype=np.float64)
    theta = np.linalg.norm(v, axis=-1)[..., None, None]
    k = np.zeros(v.shape[:-1] + (3, 3))
    k[..., 0, 1], k[..., 0, 2] = -v[..., 2], v[..., 1]
    k[..., 1, 0], k[..., 1, 2] = v[..., 2], -v[..., 0]
    k[..., 2, 0], k[..., 2, 1] = -v[..., 1], v[..., 0]
    small = theta < 1e-12
    safe = np.where(small, 1.0, theta)
    s = np.where(small, 1.0, np.sin(safe) / safe)
    c = np.where(small, 0.5, (1.0 - np.cos(safe)) / safe**2)
    eye = np.broadcast_to(np.eye(3), k.shape)
    return eye + s * k + c * (k @ k)


def cryosparc_pose_to_relion_matrix(rotvec: npt.ArrayLike) -> np.ndarray:
    """CryoSPARC ``alignments3D/pose`` to RELION's projection matrix ``A``.

    cryoSPARC stores the axis-angle vector of the rotation that takes projection coordinates back
    to the reference frame; RELION's ``A`` (reference → projection) is its transpose. pyem's
    ``csparc2star`` and cryoDRGN's ``parse_pose_csparc`` use the same relation. cryoSPARC's
    ``alignments3D/shift`` is already in pixels with RELION's sign.

    Parameters
    ----------
    rotvec
        ``(..., 3)`` radians.

    Returns
    -------
    ``(..., 3, 3)`` RELION ``A`` matrices.
    """
    return np.swapaxes(rotvec_to_matrix(rotvec), -1, -2)


def matrix_to_rotvec(matrix: npt.ArrayLike) -> np.ndarray:
    """Rotation matrices to axis-angle vectors (the inverse of :func:`rotvec_to_matrix`).

    Parameters
    ----------
    matrix
        ``(..., 3, 3)`` rotation matrices acting on column vectors.

    Returns
    -------
    ``(..., 3)`` float64 axis × angle, the angle in ``[0, π]`` radians.
    """
    from scipy.spatial.transform import Rotation  # when needed: keeps this module's import light

    a = np.asarray(matrix, dtype=np.float64)
    if a.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_rotvec expects (..., 3, 3) matrices, got shape {a.shape}")
    flat = a.reshape(-1, 3, 3)
    out = Rotation.from_matrix(flat).as_rotvec() if len(flat) else np.zeros((0, 3))
    return np.asarray(out, dtype=np.float64).reshape(a.shape[:-2] + (3,))


def relion_matrix_to_cryosparc_pose(matrix: npt.ArrayLike) -> np.ndarray:
    """RELION's projection matrix ``A`` to cryoSPARC ``alignments3D/pose`` (radians, ``(..., 3)``).

    The inverse of :func:`cryosparc_pose_to_relion_matrix`: the axis-angle vector of ``Aᵀ``.
    """
    return matrix_to_rotvec(np.swapaxes(np.asarray(matrix, dtype=np.float64), -1, -2))


# ----------------------------------------------------------------------------------------------
# Atomic models in a map's frame
# ----------------------------------------------------------------------------------------------
def model_to_box_px(coords: npt.ArrayLike, pixel_size: float, box: int, origin: Any = 0.0) -> np.ndarray:
    """Atom positions (Å, map frame) → px from the map box's centre: ``(xyz − origin) / a − box // 2``.

    ``origin`` is the position (Å) of voxel ``[0, 0, 0]`` (0 for RELION and cryoSPARC maps).
    """
    out: np.ndarray = (np.asarray(coords, dtype=np.float64) - np.asarray(origin, dtype=np.float64)) / pixel_size
    return out - box_center(box)


def box_px_to_model(points: npt.ArrayLike, pixel_size: float, box: int, origin: Any = 0.0) -> np.ndarray:
    """Invert :func:`model_to_box_px`: px from the box's centre → Å in the map frame."""
    px = np.asarray(points, dtype=np.float64) + box_center(box)
    out: np.ndarray = px * pixel_size + np.asarray(origin, dtype=np.float64)
    return out


# ----------------------------------------------------------------------------------------------
# Shifts and pixel sizes
# ----------------------------------------------------------------------------------------------
def shift_angstrom_to_pixels(shift_angstrom: ArrayT, pixel_size: Any) -> ArrayT:
    """RELION ≥ 3.1 origin shift (``rlnOriginXAngst``, Å) to pixels: ``shift / pixel_size``."""
    return shift_angstrom / pixel_size  # type: ignore[no-any-return]


def shift_pixels_to_angstrom(shift_pixels: ArrayT, pixel_size: Any) -> ArrayT:
    """Pixels to RELION ≥ 3.1 origin shift in Å: ``shift * pixel_size``."""
    return shift_pixels * pixel_size  # type: ignore[no-any-return]


#: Shift columns by convention: (x, y, unit). RELION 3.0 stores pixels, ≥ 3.1 Ångström.
SHIFT_COLUMNS_ANGSTROM = ("rlnOriginXAngst", "rlnOriginYAngst")
SHIFT_COLUMNS_PIXELS = ("rlnOriginX", "rlnOriginY")


def resolve_pixel_size(row: Mapping[str, Any]) -> float | None:
    """Pixel size (Å) of particle images from RELION metadata, by precedence.

    1. ``rlnImagePixelSize`` (RELION ≥ 3.1 optics group);
    2. ``rlnPixelSize`` (some RELION 3.0 exports);
    3. ``rlnDetectorPixelSize`` (µm) × 10⁴ / ``rlnMagnification`` (RELION 3.0).

    ``rlnMicrographOriginalPixelSize`` and ``rlnMicrographPixelSize`` describe micrographs, not
    the extracted (possibly binned) particles, and are never used. MRC headers of particle stacks
    are never used either.

    Returns ``None`` when none of these is present; the caller reports the error with the file.
    """
    for key in ("rlnImagePixelSize", "rlnPixelSize"):
        if key in row and row[key] is not None and np.isfinite(float(row[key])):
            value = float(row[key])
            if value > 0:
                return value
    if "rlnDetectorPixelSize" in row and "rlnMagnification" in row:
        det, mag = float(row["rlnDetectorPixelSize"]), float(row["rlnMagnification"])
        if det > 0 and mag > 0:
            return det * 1.0e4 / mag
    return None


def rescale_factor(box_from: int, box_to: int) -> float:
    """Factor that converts lengths in pixels of a ``box_from`` box to pixels of ``box_to``.

    Fourier cropping an image of ``box_from`` px (pixel size p) to ``box_to`` px gives pixel size
    ``p * box_from / box_to``; a length of L px becomes ``L * box_to / box_from`` px.
    """
    return float(box_to) / float(box_from)


# ----------------------------------------------------------------------------------------------
# CTF units
# ----------------------------------------------------------------------------------------------
def electron_wavelength(voltage_kv: ArrayT | float) -> Any:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV.

    λ = 12.2643247 / sqrt(V (1 + 0.978466·10⁻⁶ V)), V in volts. 300 kV → 0.019687 Å.
    """
    v = voltage_kv * 1.0e3
    if is_tensor(v):
        import torch

        return WAVELENGTH_NUMERATOR / torch.sqrt(v * (1.0 + WAVELENGTH_RELATIVISTIC * v))
    return WAVELENGTH_NUMERATOR / np.sqrt(v * (1.0 + WAVELENGTH_RELATIVISTIC * v))


def cs_mm_to_angstrom(cs_mm: ArrayT | float) -> Any:
    """Spherical aberration from mm (RELION ``rlnSphericalAberration``) to Å: × 10⁷."""
    return cs_mm * 1.0e7
