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
from z3lib.zernike import split_axes

__all__ = [
    "backproject_points",
    "bin_amplitudes",
    "bin_points",
    "bilinear_weights",
    "gather_bilinear",
    "image_positions",
    "project_points",
    "project_volume",
    "splat_bilinear",
]


def bilinear_weights(positions: torch.Tensor, box: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and weights of the four bilinear neighbours of each position.

    Indices address a batch of images padded by :data:`_MARGIN` pixels on every side,
    ``(B, box + 2·margin, box + 2·margin)`` flattened. Positions are first clamped into that
    border (NaN to its corner), so every neighbour of every point has a valid slot; neighbours
    outside the image fall in the border, which reads as zero and is cropped after splatting,
    so points outside the image contribute nothing.

    Parameters
    ----------
    positions
        ``(B, N, 2)`` image positions ``(u, v)`` = (column, row) in pixel-index units.
    box
        image side N.

    Returns
    -------
    ``index`` ``(4, B, N)`` int64 into the flattened padded batch and ``weight`` ``(4, B, N)``,
    the neighbours in the order (u0, v0), (u0+1, v0), (u0, v0+1), (u0+1, v0+1).
    """
    base, (gu, fu, gv, fv) = _bilinear_parts(positions, box)
    index = torch.stack([base.long() + k for k in _neighbour_offsets(box)])
    return index, torch.stack([gv * gu, gv * fu, fv * gu, fv * fu])


# border (px) around the image in which the neighbours of points outside it land
_MARGIN = 2


def _neighbour_offsets(box: int) -> tuple[int, int, int, int]:
    """Flat offsets of the four bilinear neighbours from (u0, v0) in a padded image."""
    width = box + 2 * _MARGIN
    return (0, 1, width, width + 1)


def _bilinear_parts(
    positions: torch.Tensor, box: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Flat index of each point's (u0, v0) neighbour and the 1-D bilinear factors.

    Returns ``base`` ``(B, N)`` int32 (int64 past 2³¹ pixels) into the flattened batch padded
    by :data:`_MARGIN` (the neighbours are ``base + _neighbour_offsets``) and
    ``(1 − f_u, f_u, 1 − f_v, f_v)``. Each
    coordinate is clamped to ``[−margin, box + margin − 1.5]`` first (NaN to ``−margin``): a
    point outside the image keeps all four neighbours in the border, where nothing is read or
    kept, and a point inside is untouched; no masks. Whole ``(B, N)`` tensors only (no stacking
    along a short last axis, which is slow on the CPU).
    """
    width = box + 2 * _MARGIN
    lo, hi = -float(_MARGIN), box + _MARGIN - 1.5
    u = torch.nan_to_num(positions[..., 0], nan=lo).clamp_(lo, hi)
    v = torch.nan_to_num(positions[..., 1], nan=lo).clamp_(lo, hi)
    u0, v0 = torch.floor(u), torch.floor(v)
    fu, fv = u - u0, v - v0
    # offset inside one padded image, exact in floating point (width² < 2²⁴), converted once
    index = torch.int32 if positions.shape[0] * width * width < 2**31 else torch.int64
    base = torch.addcmul(u0, v0, u0.new_tensor(float(width))).to(index)
    first = torch.arange(positions.shape[0], device=positions.device, dtype=index) * (width * width)
    base += (first + (_MARGIN * width + _MARGIN)).view(-1, 1)
    return base, (1 - fu, fu, 1 - fv, fv)


class _Splat(torch.autograd.Function):
    """Bilinear splat with its gradient written out (one gather of the incoming gradient).

    Autograd through :func:`bilinear_weights` would record a dozen whole-batch operations per
    call; here the backward pass is the adjoint (a gather) and the derivative of the weights in
    closed form: ``∂/∂u = a Σ_j wv_j (g_{j,1} − g_{j,0})``, ``∂/∂v = a Σ_i wu_i (g_{1,i} − g_{0,i})``
    for a point of amplitude ``a``, ``g_{j,i}`` the gradient at its neighbour (u0 + i, v0 + j),
    zero in the border (so a point outside the image, clamped there, gets none); ``∂/∂a = Σ w g``.
    """

    @staticmethod
    def forward(ctx: Any, positions: torch.Tensor, values: torch.Tensor, box: int) -> torch.Tensor:
        b = positions.shape[0]
        width = box + 2 * _MARGIN
        base, factors = _bilinear_parts(positions, box)
        gu, fu, gv, fv = factors
        vals = values.to(positions.dtype)
        vals2 = vals.unsqueeze(0) if vals.dim() == 1 else vals
        flat = positions.new_zeros(b * width * width)
        index = base.reshape(-1)
        low, high = gv * vals2, fv * vals2  # the row factors times the amplitude
        for offset, row, column in zip(_neighbour_offsets(box), (low, low, high, high), (gu, fu, gu, fu), strict=True):
            # the neighbour base + offset of flat is neighbour base of the view flat[offset:]
            flat[offset:].index_add_(0, index, (row * column).reshape(-1))
        ctx.save_for_backward(base, *factors, vals2)
        ctx.box = box
        ctx.values_shape = values.shape
        ctx.values_dtype = values.dtype
        m = _MARGIN
        return flat.view(b, width, width)[:, m:-m, m:-m]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        base, gu, fu, gv, fv, vals2 = ctx.saved_tensors
        m = _MARGIN
        padded = torch.nn.functional.pad(grad, (m, m, m, m)).reshape(-1)
        index = base.reshape(-1)
        g00, g10, g01, g11 = (padded[k:].index_select(0, index).view_as(base) for k in _neighbour_offsets(ctx.box))
        grad_positions = grad_values = None
        # the gradient interpolated along u on the point's two rows: ∂/∂v = a (r1 − r0)
        r0 = torch.addcmul(gu * g00, fu, g10)
        r1 = torch.addcmul(gu * g01, fu, g11)
        if ctx.needs_input_grad[0]:
            b, n = base.shape
            # laid out as (B, 2, N), each coordinate contiguous, seen as (B, N, 2)
            grad_positions = vals2.new_empty((b, 2, n)).transpose(1, 2)
            torch.mul(torch.addcmul(gv * (g10 - g00), fv, g11 - g01), vals2, out=grad_positions[..., 0])
            torch.mul(r1 - r0, vals2, out=grad_positions[..., 1])
        if ctx.needs_input_grad[1]:
            grad_values = torch.addcmul(gv * r0, fv, r1)
            grad_values = grad_values.sum(0) if len(ctx.values_shape) == 1 else grad_values
            grad_values = grad_values.to(ctx.values_dtype)
        return grad_positions, grad_values, None


def splat_bilinear(positions: torch.Tensor, values: torch.Tensor, box: int) -> torch.Tensor:
    """Scatter point values into images with bilinear weights.

    Differentiable in the positions and the values (:class:`_Splat`).

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
    out: torch.Tensor = _Splat.apply(positions, values, box)  # type: ignore[no-untyped-call]
    return out


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
    m = _MARGIN
    flat = torch.nn.functional.pad(images, (m, m, m, m)).reshape(-1)
    return (flat[index] * weight).sum(0)


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
    b, n = rotations.shape[0], points.shape[0]
    # the image plane's two rows of A, (2B, 3): q_xy = A_xy (x + Z c) = A_xy x + Z (A_xy c), so
    # the rotated coefficients (B, 2, K) meet the basis in one (2B, K)·(K, N) product, 2/3 of
    # the work of deforming in 3-D first
    rows = rotations[:, :2, :].to(dtype)
    # the centre minus the shift starts each of the 2B rows, and each product accumulates onto it
    start = torch.full((b, 2), float(box_center(box)), dtype=dtype, device=rotations.device)
    if shifts is not None:
        start = start - shifts.to(dtype)
    xy_t = torch.addmm(start.reshape(2 * b, 1), rows.reshape(2 * b, 3), points.to(dtype).T)  # (2B, N)
    if coefficients is not None:
        if basis is None:
            raise ValueError("coefficients were given without the basis values at the points")
        rotated = rows @ split_axes(coefficients.to(dtype))  # (B, 2, K)
        if rotated.shape[-1] != basis.shape[-1]:
            raise ValueError(f"coefficients have K={rotated.shape[-1]} per axis but the basis has K={basis.shape[-1]}")
        xy_t = torch.addmm(xy_t, rotated.reshape(2 * b, -1), basis.to(dtype).T)
    # (B, N, 2) seen in the (B, 2, N) layout: each particle's u and v are contiguous rows
    return xy_t.reshape(b, 2, n).transpose(1, 2)


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


def bin_points(points: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample a point cloud on a coarser voxel grid by trilinear binning.

    Each point, scaled by ``scale`` (``< 1``: coarser), shares its amplitude among the eight
    corners of its voxel of the integer grid with trilinear weights; the corners that receive
    anything are the coarse cloud. The binning is linear in the amplitudes, so it is returned
    as a map (apply it with :func:`bin_amplitudes`), which stays right when the amplitudes are
    learned.

    Parameters
    ----------
    points
        ``(N, 3)`` px relative to the box centre.
    scale
        coarse px per fine px (``encoder box / box``).

    Returns
    -------
    ``coarse`` ``(M, 3)`` px of the coarse box relative to its centre (integers), and the map:
    ``source`` ``(E,)`` point index, ``target`` ``(E,)`` coarse index, ``weight`` ``(E,)``.
    """
    q = points.detach().to(torch.float64) * float(scale)
    floor = torch.floor(q)
    frac = q - floor
    corners = torch.tensor(
        [[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.float64, device=q.device
    )
    factors = torch.where(corners.bool()[None], frac[:, None, :], 1 - frac[:, None, :])  # (N, 8, 3)
    weight = factors.prod(-1).reshape(-1)
    where = (floor[:, None, :] + corners[None]).reshape(-1, 3)
    source = torch.arange(len(q), device=q.device).repeat_interleave(8)
    keep = weight > 1e-12
    coarse, target = torch.unique(where[keep], dim=0, return_inverse=True)
    dtype = points.dtype if points.is_floating_point() else torch.float32
    return coarse.to(dtype), source[keep], target, weight[keep].to(dtype)


def bin_amplitudes(
    amplitudes: torch.Tensor, source: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, m: int
) -> torch.Tensor:
    """Amplitudes ``(N,)`` of a cloud → ``(M,)`` of its coarse cloud by the map of :func:`bin_points`."""
    out = amplitudes.new_zeros(m)
    return out.index_add_(0, target, amplitudes[source] * weight.to(amplitudes.dtype))


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
