"""Deformed point-cloud projection (bilinear splatting) and its adjoint, in torch.

The forward model of a particle image without CTF (docs/conventions.md):

1. push every reference point by its field, ``p = x + d(x)`` with ``d = Z · c`` per axis;
2. rotate, ``q = A p`` (RELION ``A`` from the particle's Euler angles);
3. image position ``u = q_x − s_x + N//2`` (column), ``v = q_y − s_y + N//2`` (row);
4. bilinear splat of the point's amplitude into the four surrounding pixels of ``[row, column]``.

Neighbours that fall outside the image are dropped (their weight is lost), never a crash. Every
step is differentiable in the coefficients, the rotation matrices (hence the Euler angles), the
shifts and the amplitudes. Batched over particles; runs wherever the tensors live (CPU or CUDA).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from z3lib.conventions import box_center, euler_to_matrix
from z3lib.zernike import deformation_field

__all__ = [
    "backproject_points",
    "bilinear_weights",
    "gather_bilinear",
    "image_positions",
    "project_points",
    "project_volume",
    "splat_bilinear",
]


def bilinear_weights(positions: torch.Tensor, box: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and weights of the four bilinear neighbours of each position.

    Indices address a batch of images padded by one pixel on every side, ``(B, box+2, box+2)``
    flattened, so that every neighbour of a point within one pixel of the image has a valid
    slot; cropping the border afterwards drops what fell outside. Points further out get
    weight 0.

    Parameters
    ----------
    positions
        ``(B, N, 2)`` image positions ``(u, v)`` = (column, row) in pixel-index units.
    box
        image side N.

    Returns
    -------
    ``index`` ``(B, N, 4)`` int64 into the flattened padded batch and ``weight`` ``(B, N, 4)``.
    """
    width = box + 2
    u, v = positions[..., 0], positions[..., 1]
    u0 = torch.floor(u)
    v0 = torch.floor(v)
    inside = (u0 >= -1) & (u0 <= box - 1) & (v0 >= -1) & (v0 <= box - 1)  # False for NaN too
    u0 = torch.where(inside, u0, torch.zeros_like(u0))
    v0 = torch.where(inside, v0, torch.zeros_like(v0))
    fu = torch.where(inside, u - u0, torch.zeros_like(u))
    fv = torch.where(inside, v - v0, torch.zeros_like(v))
    valid = inside.to(positions.dtype)
    fu = fu * valid
    gu = valid - fu
    base = (v0.long() + 1) * width + (u0.long() + 1)
    base = base + torch.arange(positions.shape[0], device=positions.device).view(-1, 1) * (width * width)
    offsets = torch.tensor([0, 1, width, width + 1], device=positions.device)
    index = base.unsqueeze(-1) + offsets
    weight = torch.stack([gu * (1 - fv), fu * (1 - fv), gu * fv, fu * fv], dim=-1)
    return index, weight


def splat_bilinear(positions: torch.Tensor, values: torch.Tensor, box: int) -> torch.Tensor:
    """Scatter point values into images with bilinear weights.

    Parameters
    ----------
    positions
        ``(B, N, 2)`` (column, row) positions in pixel-index units.
    values
        ``(B, N)`` or ``(N,)`` point amplitudes.
    box
        image side N.

    Returns
    -------
    ``(B, box, box)`` images ``[row, column]``, dtype and device of ``positions``.
    """
    b = positions.shape[0]
    width = box + 2
    index, weight = bilinear_weights(positions, box)
    vals = values.to(positions.dtype)
    if vals.dim() == 1:
        vals = vals.unsqueeze(0)
    source = (weight * vals.unsqueeze(-1)).reshape(-1)
    flat = positions.new_zeros(b * width * width).index_add(0, index.reshape(-1), source)
    return flat.view(b, width, width)[:, 1:-1, 1:-1]


def gather_bilinear(images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of images at positions: the adjoint of :func:`splat_bilinear`.

    Parameters
    ----------
    images
        ``(B, N, N)``.
    positions
        ``(B, M, 2)`` (column, row) in pixel-index units; outside neighbours read 0.

    Returns
    -------
    ``(B, M)`` interpolated values.
    """
    box = images.shape[-1]
    index, weight = bilinear_weights(positions, box)
    flat = torch.nn.functional.pad(images, (1, 1, 1, 1)).reshape(-1)
    return (flat[index] * weight).sum(-1)


def image_positions(
    points: torch.Tensor,
    rotations: torch.Tensor,
    shifts: torch.Tensor | None,
    box: int,
    *,
    basis: torch.Tensor | None = None,
    coefficients: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image positions of (deformed) reference points for a batch of particles.

    Parameters
    ----------
    points
        ``(N, 3)`` reference positions ``(x, y, z)`` in px relative to the box centre.
    rotations
        ``(B, 3, 3)`` RELION ``A`` matrices.
    shifts
        ``(B, 2)`` origin shifts ``(s_x, s_y)`` in px, or None.
    box
        image side N; the centre is ``N // 2``.
    basis, coefficients
        ``(N, K)`` basis values at the points and ``(B, 3K)`` coefficients (px), or None for a
        rigid projection.

    Returns
    -------
    ``(B, N, 2)`` (column, row) positions in pixel-index units.
    """
    dtype = rotations.dtype
    pts = points.to(dtype)
    if coefficients is not None:
        if basis is None:
            raise ValueError("coefficients were given without the basis values at the points")
        pushed = pts.unsqueeze(0) + deformation_field(basis.to(dtype), coefficients.to(dtype))
    else:
        pushed = pts.unsqueeze(0).expand(rotations.shape[0], -1, -1)
    xy = torch.einsum("bij,bnj->bni", rotations[:, :2, :], pushed)
    center = float(box_center(box))
    if shifts is not None:
        xy = xy - shifts.to(dtype).unsqueeze(1)
    return xy + center


def project_points(
    points: torch.Tensor,
    amplitudes: torch.Tensor,
    rotations: torch.Tensor,
    shifts: torch.Tensor | None,
    box: int,
    *,
    basis: torch.Tensor | None = None,
    coefficients: torch.Tensor | None = None,
) -> torch.Tensor:
    """Project a (deformed) point cloud into a batch of images by bilinear splatting.

    Parameters
    ----------
    points
        ``(N, 3)`` reference positions (px, relative to the centre).
    amplitudes
        ``(N,)`` or ``(B, N)`` point amplitudes.
    rotations
        ``(B, 3, 3)`` RELION ``A`` matrices.
    shifts
        ``(B, 2)`` origin shifts in px (or None).
    box
        image side.
    basis, coefficients
        ``(N, K)`` basis values and ``(B, 3K)`` Zernike3D coefficients (px); None = rigid.

    Returns
    -------
    ``(B, box, box)`` projections (no CTF), on the device and dtype of ``rotations``.
    """
    pos = image_positions(points, rotations, shifts, box, basis=basis, coefficients=coefficients)
    return splat_bilinear(pos, amplitudes, box)


def backproject_points(
    images: torch.Tensor,
    points: torch.Tensor,
    rotations: torch.Tensor,
    shifts: torch.Tensor | None,
    *,
    basis: torch.Tensor | None = None,
    coefficients: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adjoint of :func:`project_points` with respect to the amplitudes.

    Reads each image bilinearly at the same (deformed) positions the forward projection uses.

    Returns
    -------
    ``(B, N)`` per-particle back-projected values (sum over the batch for a volume update).
    """
    box = images.shape[-1]
    pos = image_positions(points, rotations, shifts, box, basis=basis, coefficients=coefficients)
    return gather_bilinear(images.to(pos.dtype), pos)


def project_volume(
    volume: Any,
    rotations: torch.Tensor,
    shifts: torch.Tensor | None = None,
    *,
    mask: Any = None,
) -> torch.Tensor:
    """Rigid projection of a ``[z, y, x]`` map: the zero-field case of :func:`project_points`.

    Parameters
    ----------
    volume
        ``(N, N, N)`` map (numpy or torch).
    rotations
        ``(B, 3, 3)`` RELION ``A`` matrices (torch); their dtype and device are used.
    shifts
        ``(B, 2)`` origin shifts in px, or None.
    mask
        optional ``(N, N, N)`` boolean/float mask; only voxels with mask > 0.5 are projected.

    Returns
    -------
    ``(B, N, N)`` projections.
    """
    from z3lib.geometry import points_from_volume

    points, values = points_from_volume(volume, mask=mask)
    pts = torch.as_tensor(points, dtype=rotations.dtype, device=rotations.device)
    amp = torch.as_tensor(values, dtype=rotations.dtype, device=rotations.device)
    box = int(np.asarray(volume.shape)[-1])
    return project_points(pts, amp, rotations, shifts, box)


def rotations_from_euler(
    rot: Any, tilt: Any, psi: Any, *, device: Any = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(B, 3, 3)`` torch RELION matrices from Euler angles in degrees (differentiable)."""
    angles = [torch.as_tensor(a, dtype=dtype, device=device) for a in (rot, tilt, psi)]
    return euler_to_matrix(*angles).reshape(-1, 3, 3)  # type: ignore[no-any-return]
