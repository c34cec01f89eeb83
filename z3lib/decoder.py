"""The physical forward model shared by the network and the refinement.

Deform → rotate → shift → splat → CTF, the image circle and the image loss.

Units are pixels of the processing box: the point cloud ``(N, 3)`` px relative to the box centre,
coefficients ``(B, 3K)`` px with ``Rmax = box / 2``, shifts ``(B, 2)`` px, images ``(B, box, box)``
(docs/conventions.md). Nothing here knows the network: the decoder is built from its point cloud, a
:class:`~z3lib.zernike.ZernikeSpec` on the processing box and :class:`DecoderSettings` (roughness
measure, CTF padding, learned reference), which :class:`DecoderOptions` and the network's settings
both are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from z3lib import zernike as zk
from z3lib.atoms import CLASH_A
from z3lib.conventions import box_center
from z3lib.ctf import CtfParams, compute_ctf, filter_images
from z3lib.projection import bin_amplitudes, bin_points, image_positions, splat_bilinear
from z3lib.settings import check_choices

Loss = Literal["corr", "frc", "mse"]
Roughness = Literal["strain", "gradient"]


class DecoderSettings(Protocol):
    """What :class:`PhysicalDecoder` needs besides its basis: any object with these attributes.

    :class:`DecoderOptions`, or a :class:`z3lib.network.NetworkConfig`.
    """

    @property
    def roughness(self) -> Roughness:
        """Field roughness measure: ``"strain"`` (|sym ∇d|², rigid motions free) or ``"gradient"`` (|∇d|²)."""

    @property
    def ctf_pad(self) -> int:
        """Padding factor of the box the CTF is applied on."""

    @property
    def learn_reference(self) -> bool:
        """Whether the amplitudes are a parameter (amplitudes + scale · delta)."""


@dataclass(frozen=True)
class DecoderOptions:
    """The settings of a :class:`PhysicalDecoder` on their own (refinement's fixed map)."""

    roughness: Roughness  # "strain": |sym ∇d|² (rigid motions free) | "gradient": |∇d|²
    ctf_pad: int  # the CTF is applied on a box padded this many times
    learn_reference: bool  # the amplitudes are a parameter (amplitudes + scale · delta)

    def __post_init__(self) -> None:
        check_choices(self)


def circle_mask(
    box: int, radius_fraction: float, *, device: Any = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(box, box)`` soft circular mask of radius ``radius_fraction · box / 2`` (2 px cosine edge)."""
    c = box_center(box)
    ax = torch.arange(box, device=device, dtype=dtype) - c
    r = torch.sqrt(ax[:, None] ** 2 + ax[None, :] ** 2)
    radius = radius_fraction * box / 2
    edge = 2.0
    soft = 0.5 * (1 + torch.cos(math.pi * torch.clamp((r - radius) / edge, 0, 1)))
    return soft


class PhysicalDecoder(nn.Module):
    """Coefficients + pose + CTF → predicted particle images.

    Holds the point cloud (``(N, 3)`` px of the processing box), its amplitudes, the basis values
    ``Z`` (``(N, K)``) and the quadratic forms of the field regularisers as buffers.

    Parameters
    ----------
    points, amplitudes
        ``(N, 3)`` px of the processing box and ``(N,)`` the reference point cloud.
    spec
        The Zernike3D basis on the processing box (its ``box`` is the image size, px).
    pixel_size
        Pixel size (Å) of the processing box.
    settings
        ``roughness``, ``ctf_pad`` and ``learn_reference`` (:class:`DecoderOptions`, or the
        network's settings).
    blur_px
        σ (px) of an isotropic Gaussian every point carries (atoms, :mod:`z3lib.atoms`); 0: none
        (a map's voxels). Projections are filtered by its 2D transform ``exp(−2π²σ²k²)``.
    pairs
        ``(M, 2)`` point pairs whose distances :meth:`pair_strain` measures (an atomic model's
        bonds and Cα–Cα links), or None.
    contacts
        ``(R, 2)`` point pairs that must not come closer than :attr:`clash_px` (atoms more than
        two bonds apart; :meth:`clash_penalty`), or None.
    smooth_points
        ``(N', 3)`` px: where the field energy and roughness are averaged (an atomic model's cloud:
        the mask's voxels, so that the fields stay smooth between and around the atoms, where ZART
        uses them too); None: over ``points``.
    """

    points: torch.Tensor
    amplitudes: torch.Tensor
    basis: torch.Tensor
    energy_form: torch.Tensor
    smooth_form: torch.Tensor
    cross_form: torch.Tensor
    blur: torch.Tensor
    pairs: torch.Tensor
    pair_lengths: torch.Tensor
    contacts: torch.Tensor

    def __init__(
        self,
        points: torch.Tensor,
        amplitudes: torch.Tensor,
        spec: zk.ZernikeSpec,
        pixel_size: float,
        settings: DecoderSettings,
        *,
        blur_px: float = 0.0,
        pairs: torch.Tensor | None = None,
        smooth_points: torch.Tensor | None = None,
        contacts: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.box = spec.box
        self.pixel_size = float(pixel_size)
        self.ctf_pad = int(settings.ctf_pad)
        points = points.detach()
        amplitudes = amplitudes.detach()
        z = spec.evaluate(points.to(torch.float64))
        # the regularisers' points: the projected ones, or (atoms) the voxels of the whole mask
        where = points if smooth_points is None else torch.as_tensor(smooth_points).detach()
        pts = where.to(torch.float64).clone().requires_grad_(True)
        z_reg = spec.evaluate(pts)
        # ∂Z_k/∂x_j at every point, by autograd through the polynomial basis
        grads = []
        for k in range(z_reg.shape[1]):
            (g,) = torch.autograd.grad(z_reg[:, k].sum(), pts, retain_graph=True)
            grads.append(g)
        grad = torch.stack(grads, dim=1)  # (N, K, 3)
        n = z_reg.shape[0]
        energy = (z_reg.T @ z_reg / n).detach()
        smooth = torch.einsum("nkj,nlj->kl", grad, grad).detach() / n
        # Σ_aj J_aj J_ja of the Jacobian J_aj = Σ_k c_ak ∂_j Z_k: X[k, j, l, a] = mean ∂_j Z_k ∂_a Z_l
        cross = torch.einsum("nkj,nla->kjla", grad, grad).detach() / n
        self.strain = settings.roughness == "strain"
        self.register_buffer("points", points.to(torch.float32))
        self.register_buffer("amplitudes", amplitudes.to(torch.float32))
        self.register_buffer("basis", z.detach().to(torch.float32))
        self.register_buffer("energy_form", energy.to(torch.float32))
        self.register_buffer("smooth_form", smooth.to(torch.float32))
        self.register_buffer("cross_form", cross.to(torch.float32) if self.strain else torch.zeros(0), persistent=False)
        self.register_buffer("blur", torch.tensor(float(blur_px), dtype=torch.float32))
        self.blurred = float(blur_px) > 0  # on the host: whether transfer() includes the blur
        pair_index = (
            torch.zeros((0, 2), dtype=torch.long) if pairs is None else torch.as_tensor(pairs).long().reshape(-1, 2)
        )
        self.register_buffer("pairs", pair_index)
        contact_index = (
            torch.zeros((0, 2), dtype=torch.long)
            if contacts is None
            else torch.as_tensor(contacts).long().reshape(-1, 2)
        )
        self.register_buffer("contacts", contact_index)
        self.clash_px = CLASH_A / self.pixel_size
        ends = points.to(torch.float32)[pair_index]  # (M, 2, 3)
        self.register_buffer("pair_lengths", (ends[:, 0] - ends[:, 1]).norm(dim=-1), persistent=False)
        # learned reference (3DFlex-like): amplitudes + scale · delta, delta in units of the
        # largest starting amplitude so that one learning rate suits every map's scale
        self.amplitude_scale = float(amplitudes.abs().max().clamp_min(1e-12))
        self.amplitude_delta: nn.Parameter | None = None
        if settings.learn_reference:
            self.amplitude_delta = nn.Parameter(torch.zeros(z.shape[0], dtype=torch.float32))

    def values(self) -> torch.Tensor:
        """``(N,)`` the amplitudes the decoder projects (the starting ones, or the learned ones)."""
        if self.amplitude_delta is None:
            return self.amplitudes
        return self.amplitudes + self.amplitude_scale * self.amplitude_delta

    def field_energy(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Mean squared displacement over the points (px²), ``(B, 3K)`` → ``(B,)``."""
        c = zk.split_axes(coefficients)
        return torch.einsum("bak,kl,bal->b", c, self.energy_form, c)

    def field_roughness(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Mean roughness of the field over the points, ``(B, 3K)`` px → ``(B,)``.

        ``strain`` (default): the squared Frobenius norm of the strain ``(J + Jᵀ) / 2`` of the
        field's Jacobian ``J`` — linear elasticity's energy without the volume term. A rigid motion
        (translation or rotation, of the whole particle or of a domain) costs nothing where it is
        rigid, so a hinge motion is not shrunk towards a smaller, more spread-out field; only
        where the field bends or stretches does it pay. ``gradient``: ``|J|²`` (rotations pay too).
        """
        c = zk.split_axes(coefficients)
        grad2 = torch.einsum("bak,kl,bal->b", c, self.smooth_form, c)
        if not self.strain:
            return grad2
        # |sym J|² = (|J|² + Σ_aj J_aj J_ja) / 2
        return 0.5 * grad2 + 0.5 * torch.einsum("bak,kjla,bjl->b", c, self.cross_form, c)

    def pair_strain(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Mean squared change of the pairs' distances (px²), ``(B, 3K)`` → ``(B,)``; 0 without pairs."""
        if not len(self.pairs):
            return coefficients.new_zeros(coefficients.shape[0])
        c = zk.split_axes(coefficients)  # (B, 3, K)
        p0, p1 = self.pairs[:, 0], self.pairs[:, 1]
        diff_basis = self.basis[p0] - self.basis[p1]  # (M, K)
        moved = (self.points[p0] - self.points[p1]).unsqueeze(0) + torch.einsum("mk,bak->bma", diff_basis, c)
        strain: torch.Tensor = ((moved.norm(dim=-1) - self.pair_lengths) ** 2).mean(dim=1)
        return strain

    def clash_penalty(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Mean over the contacts of ``max(0, clash_px − distance)²`` (px²), ``(B, 3K)`` → ``(B,)``."""
        if not len(self.contacts):
            return coefficients.new_zeros(coefficients.shape[0])
        c = zk.split_axes(coefficients)
        p0, p1 = self.contacts[:, 0], self.contacts[:, 1]
        moved = (self.points[p0] - self.points[p1]).unsqueeze(0) + torch.einsum(
            "mk,bak->bma", self.basis[p0] - self.basis[p1], c
        )
        penalty: torch.Tensor = (torch.relu(self.clash_px - moved.norm(dim=-1)) ** 2).mean(dim=1)
        return penalty

    def blur_transfer(
        self, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> torch.Tensor | None:
        """Return the points' Gaussian on the padded rfft grid, ``(P, P // 2 + 1)``; None without blur."""
        sigma = float(self.blur)
        if sigma <= 0:
            return None
        size = self.ctf_pad * self.box
        dev = device if device is not None else self.points.device
        ky = torch.fft.fftfreq(size, device=dev, dtype=torch.float64)
        kx = torch.fft.rfftfreq(size, device=dev, dtype=torch.float64)
        k2 = ky[:, None] ** 2 + kx[None, :] ** 2
        return torch.exp(-2.0 * torch.pi**2 * sigma**2 * k2).to(dtype)

    def transfer(
        self,
        ctf: CtfParams,
        *,
        phase_flipped: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Return the batch's CTFs on the padded rfft grid, ``(B, pad·box, pad·box // 2 + 1)``.

        ``|CTF|`` for phase-flipped data. Compute once per batch and pass to :meth:`forward` to reuse.
        """
        dev = device if device is not None else self.points.device
        out = compute_ctf(self.ctf_pad * self.box, self.pixel_size, ctf.to(dev, dtype))
        out = out.abs() if phase_flipped else out
        blur = self.blur_transfer(dtype, dev)
        return out if blur is None else out * blur

    def deformed_points(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Move the point cloud by each field: ``(M, 3K)`` px → ``(M, N, 3)`` px.

        Fields shared by many particles (a grid of landscape scores) are applied once here and
        projected per particle with :meth:`project_points`, instead of once per particle.
        """
        c = zk.split_axes(coefficients.to(self.basis.dtype))  # (M, 3, K)
        return self.points.unsqueeze(0) + torch.einsum("nk,mak->mna", self.basis, c)

    def field_offsets(self, coefficients: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """Each particle's field as it moves the points in its image: ``(B, 3K)`` px, ``(B, 3, 3)`` → ``(B, N, 2)`` px.

        The image-plane rows of each rotation applied to the field at every point (shifts and
        the cloud itself excluded); :meth:`project_points` adds them to a shared cloud's positions.
        """
        rotated: torch.Tensor = rotations[:, :2, :].to(self.basis.dtype) @ zk.split_axes(
            coefficients.to(self.basis.dtype)
        )
        return (rotated @ self.basis.T).transpose(1, 2)

    def project_points(
        self,
        points: torch.Tensor,
        rotations: torch.Tensor,
        shifts: torch.Tensor,
        transfer: torch.Tensor,
        *,
        offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Project one (deformed) cloud ``(N, 3)`` px at a batch's poses → ``(B, box, box)`` images.

        ``rotations`` ``(B, 3, 3)``, ``shifts`` ``(B, 2)`` px, ``transfer`` the batch's
        :meth:`transfer`, ``offsets`` ``(B, N, 2)`` px (:meth:`field_offsets`) or None.
        ``forward(c + c_i, ...)`` equals ``project_points(deformed_points(c[None])[0], ...,
        offsets=field_offsets(c_i, ...))`` for every particle ``i`` of the batch.
        """
        pos = image_positions(points, rotations, shifts, self.box)
        if offsets is not None:
            pos = pos + offsets.to(pos.dtype)
        proj = splat_bilinear(pos, self.values(), self.box)
        return filter_images(proj, transfer.to(proj.dtype), pad=self.ctf_pad)

    def forward(
        self,
        coefficients: torch.Tensor | None,
        rotations: torch.Tensor,
        shifts: torch.Tensor,
        ctf: CtfParams | None,
        *,
        phase_flipped: bool = False,
        transfer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, 3K)`` px, ``(B, 3, 3)``, ``(B, 2)`` px, CTF → ``(B, box, box)`` images.

        ``transfer`` is the batch's :meth:`transfer` when already computed (it then replaces
        ``ctf`` and ``phase_flipped``).
        """
        pos = image_positions(
            self.points,
            rotations,
            shifts,
            self.box,
            basis=None if coefficients is None else self.basis,
            coefficients=coefficients,
        )
        proj = splat_bilinear(pos, self.values(), self.box)
        if transfer is None:
            if ctf is None:
                blur = self.blur_transfer(proj.dtype, proj.device)
                return proj if blur is None else filter_images(proj, blur, pad=self.ctf_pad)
            transfer = self.transfer(ctf, phase_flipped=phase_flipped, dtype=proj.dtype, device=proj.device)
        return filter_images(proj, transfer.to(proj.dtype), pad=self.ctf_pad)


#: the most the coarse reference's spectrum is raised to undo its two interpolations' blur
COARSE_GAIN_MAX = 2.0


class CoarseReference(nn.Module):
    """The undeformed reference projected straight onto the encoder's coarser grid.

    What the encoder's reference channel shows: the decoder's cloud at the particle's pose,
    filtered by its CTF, at ``n`` px instead of the processing box's ``N``. The cloud is binned
    trilinearly onto the coarse voxel grid (:func:`~z3lib.projection.bin_points`; about
    ``(n / N)³`` as many points, so the splat costs that much less), splatted at ``n`` px, and
    filtered on the padded coarse grid by the batch's transfer cut to the same frequencies
    (the coarse grid's frequencies are the fine grid's lowest ones: no second CTF evaluation)
    times the inverse of the blur of the two interpolations — ``sinc²`` along each image axis
    for the splat, ``sinc²(|k|)`` for the binning (isotropic to within 6 %) — capped at
    :data:`COARSE_GAIN_MAX` (raising it further amplifies the coarse grid's aliasing).
    On the demo (box 64 → 32, 11,256 points → 1,966) it correlates 0.996 on average with the
    full-box projection filtered and Fourier-cropped to the same size.

    Parameters
    ----------
    decoder
        the physical decoder (its points, amplitudes — learned or not — and CTF padding).
    n
        the coarse image side (the encoder's box), ``≤`` the decoder's box.
    """

    coarse_points: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    rows: torch.Tensor
    gain: torch.Tensor

    def __init__(self, decoder: PhysicalDecoder, n: int) -> None:
        super().__init__()
        box, pad = decoder.box, decoder.ctf_pad
        if not 0 < n <= box:
            raise ValueError(f"the coarse reference needs 0 < n <= box, got n={n}, box={box}")
        self.n, self.scale, self.pad = int(n), n / box, pad
        coarse, source, target, weight = bin_points(decoder.points, self.scale)
        self.m = len(coarse)
        for name, value in (("coarse_points", coarse), ("source", source), ("target", target), ("weight", weight)):
            self.register_buffer(name, value, persistent=False)
        # the fine padded rfft grid's rows holding the coarse padded grid's frequencies
        size, fine = pad * self.n, pad * box
        rows = torch.cat([torch.arange((size + 1) // 2), torch.arange(fine - size // 2, fine)])
        self.register_buffer("rows", rows, persistent=False)
        ky = torch.fft.fftfreq(size, dtype=torch.float64)[:, None]  # cycles per coarse px
        kx = torch.fft.rfftfreq(size, dtype=torch.float64)[None, :]
        atten = (torch.sinc(ky) * torch.sinc(kx)) ** 2 * torch.sinc(torch.sqrt(ky**2 + kx**2)) ** 2
        self.register_buffer("gain", (1 / atten).clamp(max=COARSE_GAIN_MAX).float(), persistent=False)

    def forward(
        self, values: torch.Tensor, rotations: torch.Tensor, shifts: torch.Tensor, transfer: torch.Tensor | None
    ) -> torch.Tensor:
        """Project ``(N,)`` amplitudes at ``(B, 3, 3)`` poses → ``(B, n, n)`` coarse images.

        ``shifts`` ``(B, 2)`` are px of the fine box; ``transfer`` is the batch's filter on the
        fine padded rfft grid, ``(B, P, P // 2 + 1)`` or one for all, or None (no filter).
        """
        amplitudes = bin_amplitudes(values, self.source, self.target, self.weight, self.m)
        pos = image_positions(self.coarse_points, rotations, shifts * self.scale, self.n)
        proj = splat_bilinear(pos, amplitudes, self.n)
        filt = self.gain if transfer is None else transfer[..., self.rows, : self.pad * self.n // 2 + 1] * self.gain
        return filter_images(proj, filt.to(proj.dtype), pad=self.pad)


def image_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str, frc_radius: float = 0.85
) -> torch.Tensor:
    """Per-image loss, ``(B,)``.

    ``corr``: 1 − Pearson correlation inside the mask; ``mse``: mean squared error after the
    least-squares scale of the prediction (the map's scale is arbitrary); ``frc``: 1 − mean
    Fourier-ring correlation up to ``frc_radius`` of Nyquist.
    """
    if kind == "corr" or kind == "mse":
        w = mask.reshape(1, -1)
        p = pred.reshape(pred.shape[0], -1)
        t = target.reshape(target.shape[0], -1)
        sw = w.sum()
        p = p - (p * w).sum(1, keepdim=True) / sw
        t = t - (t * w).sum(1, keepdim=True) / sw
        pt = (p * t * w).sum(1)
        pp = (p * p * w).sum(1)
        tt = (t * t * w).sum(1)
        if kind == "corr":
            return 1.0 - pt / torch.sqrt(pp * tt + 1e-12)
        scale = pt / (pp + 1e-12)
        return ((scale[:, None] * p - t) ** 2 * w).sum(1) / sw
    if kind == "frc":
        box = pred.shape[-1]
        fp, ft = torch.fft.rfft2(pred), torch.fft.rfft2(target)
        fy = torch.fft.fftfreq(box, device=pred.device)
        fx = torch.fft.rfftfreq(box, device=pred.device)
        ring = torch.round(torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) * box).long()
        n_rings = int(frc_radius * box / 2)
        keep = (ring >= 1) & (ring <= n_rings)
        idx = ring[keep] - 1
        cross = (fp * ft.conj()).real[:, keep]
        pp = (fp.abs() ** 2)[:, keep]
        tt = (ft.abs() ** 2)[:, keep]
        z = pred.new_zeros(pred.shape[0], n_rings)
        num = z.index_add(1, idx, cross)
        den = torch.sqrt(z.index_add(1, idx, pp) * z.index_add(1, idx, tt) + 1e-12)
        return 1.0 - (num / den).mean(1)
    raise ValueError(f"unknown loss {kind!r}; use 'corr', 'frc' or 'mse'")
