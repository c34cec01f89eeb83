"""Contrast transfer function (RELION's model) in torch: evaluation, application, corrections.

:func:`ctf_model` and :func:`ctf_grid` serve numpy and cupy too; torch is imported only when a
torch function runs, so importing this module does not import it.

Model (docs/algorithms.md §2, RELION ``ctf.h``):

* ``λ`` from :func:`z3lib.conventions.electron_wavelength`, Cs in Å, angles in radians inside.
* ``Δf(α) = (dU + dV)/2 + (dU − dV)/2 · cos 2(α − α_ast)``, underfocus positive, α the azimuth of
  the frequency vector measured from the x axis (image columns).
* ``γ = −π λ Δf s² + (π/2) Cs λ³ s⁴ − φ_shift``.
* ``CTF = −(√(1 − w²) sin γ − w cos γ) · exp(−B s² / 4) · scale`` so that ``CTF(0) = +w``:
  positive density stays positive at low frequency.

Grids are in cycles/Å. ``rfft=True`` grids have shape ``(N, N // 2 + 1)`` and match
``torch.fft.rfft2`` of ``[y, x]`` images; ``rfft=False`` grids are ``(N, N)`` in ``fft2`` order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from z3lib.conventions import cs_mm_to_angstrom, electron_wavelength

if TYPE_CHECKING:
    import torch


@dataclass
class CtfParams:
    """Per-image CTF parameters, each a ``(B,)`` tensor (RELION units).

    defocus_u, defocus_v: Å (underfocus positive); defocus_angle: degrees; voltage: kV;
    cs: mm; amplitude_contrast: fraction w; phase_shift: degrees; bfactor: Å²; scale: factor.
    """

    defocus_u: torch.Tensor
    defocus_v: torch.Tensor
    defocus_angle: torch.Tensor
    voltage: torch.Tensor
    cs: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift: torch.Tensor
    bfactor: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def create(
        cls,
        defocus_u: Any,
        defocus_v: Any,
        defocus_angle: Any = 0.0,
        voltage: Any = 300.0,
        cs: Any = 2.7,
        amplitude_contrast: Any = 0.1,
        phase_shift: Any = 0.0,
        bfactor: Any = 0.0,
        scale: Any = 1.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> CtfParams:
        """Build from numbers, arrays or tensors, broadcast to a common ``(B,)`` shape.

        ``dtype`` None: float32.
        """
        import torch

        dtype = torch.float32 if dtype is None else dtype
        values = [defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast, phase_shift, bfactor, scale]
        tensors = [torch.as_tensor(v, dtype=dtype, device=device).reshape(-1) for v in values]
        tensors = list(torch.broadcast_tensors(*tensors))  # type: ignore[no-untyped-call]
        return cls(*tensors)

    @classmethod
    def from_table(
        cls,
        table: Any,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> CtfParams:
        """Build from a particle table with z3's canonical columns (see :func:`z3lib.io.read_particles`).

        ``dtype`` None: float32.
        """

        def col(name: str, default: float) -> Any:
            return np.array(table[name], dtype=np.float64) if name in table else default

        return cls.create(
            col("defocus_u", np.nan),
            col("defocus_v", np.nan),
            col("defocus_angle", 0.0),
            col("voltage", 300.0),
            col("cs", 2.7),
            col("amplitude_contrast", 0.1),
            col("phase_shift", 0.0),
            col("bfactor", 0.0),
            col("ctf_scale", 1.0),
            device=device,
            dtype=dtype,
        )

    def __len__(self) -> int:
        return int(self.defocus_u.shape[0])

    def __getitem__(self, index: Any) -> CtfParams:
        return CtfParams(*(getattr(self, f.name)[index].reshape(-1) for f in fields(self)))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CtfParams:
        """Return a copy with every field moved to ``device`` and/or cast to ``dtype``."""
        return CtfParams(*(getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)))


def frequency_grid(
    box: int,
    pixel_size: float,
    *,
    rfft: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial frequencies ``(s_x, s_y)`` in cycles/Å of a ``box × box`` image's Fourier transform.

    Returns two ``(box, box // 2 + 1)`` tensors (``rfft=True``) or ``(box, box)`` (``fft2`` order),
    float32 unless ``dtype`` is given.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    fy = torch.fft.fftfreq(box, d=pixel_size, device=device, dtype=dtype)
    fx = (torch.fft.rfftfreq if rfft else torch.fft.fftfreq)(box, d=pixel_size, device=device, dtype=dtype)
    sy, sx = torch.meshgrid(fy, fx, indexing="ij")
    return sx, sy


def evaluate_ctf(
    s_x: torch.Tensor,
    s_y: torch.Tensor,
    params: CtfParams,
) -> torch.Tensor:
    """CTF values at given frequencies.

    Parameters
    ----------
    s_x, s_y
        frequency components in cycles/Å, any shape ``F`` (broadcast together).
    params
        ``B`` parameter sets.

    Returns
    -------
    ``(B,) + F`` CTF values (differentiable in every parameter).
    """
    import torch

    extra = (1,) * s_x.dim()
    p = {f.name: getattr(params, f.name).reshape((-1,) + extra) for f in fields(params)}
    out: torch.Tensor = ctf_model(torch, s_x, s_y, **p)
    return out


def ctf_model(
    xp: Any,
    s_x: Any,
    s_y: Any,
    *,
    defocus_u: Any,
    defocus_v: Any,
    defocus_angle: Any,
    voltage: Any,
    cs: Any,
    amplitude_contrast: Any,
    phase_shift: Any,
    bfactor: Any,
    scale: Any,
) -> Any:
    """Evaluate the CTF formula itself, for any array namespace ``xp`` (torch, numpy or cupy).

    Frequencies in cycles/Å, parameters in RELION units (see the module docstring); all inputs
    broadcast together. This is the one implementation of the model: the torch path
    (:func:`evaluate_ctf`) and the numpy/cupy ZART back ends both call it.
    """
    lam = electron_wavelength(voltage)
    cs_a = cs_mm_to_angstrom(cs)
    s2 = s_x * s_x + s_y * s_y
    alpha = xp.arctan2(s_y, s_x)
    mean = 0.5 * (defocus_u + defocus_v)
    half = 0.5 * (defocus_u - defocus_v)
    defocus = mean + half * xp.cos(2.0 * (alpha - xp.deg2rad(defocus_angle)))
    gamma = -math.pi * lam * defocus * s2 + 0.5 * math.pi * cs_a * lam**3 * s2 * s2 - xp.deg2rad(phase_shift)
    w = amplitude_contrast
    ctf = -(xp.sqrt(1.0 - w * w) * xp.sin(gamma) - w * xp.cos(gamma))
    return ctf * xp.exp(-bfactor * s2 / 4.0) * scale


def ctf_grid(xp: Any, box: int, pixel_size: float, table: Any, dtype: Any = None) -> Any:
    """``(B, box, box // 2 + 1)`` CTFs on the rfft grid with any array namespace (numpy, cupy).

    ``table`` maps the canonical column names (``defocus_u`` … ``ctf_scale``) to ``(B,)`` arrays.
    """
    fy = xp.fft.fftfreq(box, d=pixel_size)
    fx = xp.fft.rfftfreq(box, d=pixel_size)
    sy, sx = fy[:, None], fx[None, :]

    def col(name: str, default: float) -> Any:
        v = table.get(name, default)
        return xp.asarray(v, dtype=xp.float64).reshape(-1, 1, 1)

    out = ctf_model(
        xp,
        sx,
        sy,
        defocus_u=col("defocus_u", math.nan),
        defocus_v=col("defocus_v", math.nan),
        defocus_angle=col("defocus_angle", 0.0),
        voltage=col("voltage", 300.0),
        cs=col("cs", 2.7),
        amplitude_contrast=col("amplitude_contrast", 0.1),
        phase_shift=col("phase_shift", 0.0),
        bfactor=col("bfactor", 0.0),
        scale=col("ctf_scale", 1.0),
    )
    return out.astype(dtype) if dtype is not None else out


def compute_ctf(
    box: int,
    pixel_size: float,
    params: CtfParams,
    *,
    rfft: bool = True,
) -> torch.Tensor:
    """CTF on the Fourier grid of a ``box``-pixel image.

    Returns ``(B, box, box // 2 + 1)`` (``rfft=True``) or ``(B, box, box)`` tensors on the
    parameters' device and dtype.
    """
    sx, sy = frequency_grid(box, pixel_size, rfft=rfft, device=params.defocus_u.device, dtype=params.defocus_u.dtype)
    return evaluate_ctf(sx, sy, params)


def filter_images(images: torch.Tensor, transfer: torch.Tensor, *, pad: int = 1) -> torch.Tensor:
    """Multiply the images' spectra by a real filter given on the (padded) rfft grid.

    Parameters
    ----------
    images
        ``(B, N, N)`` real images.
    transfer
        ``(B, pad·N, pad·N // 2 + 1)`` (or broadcastable) real filter.
    pad
        zero-padding factor; the image is padded to ``pad·N`` and cropped back after filtering,
        which avoids wrap-around of the CTF's delocalised signal.

    Returns
    -------
    ``(B, N, N)`` filtered images.
    """
    import torch

    n = images.shape[-1]
    size = round(pad * n)
    # zero-padded by the transform itself, the image in the padded grid's corner: a circular
    # convolution commutes with the shift, so cropping the corner back equals padding around
    # the centre and cropping the centre (no padded copy of the batch is made)
    spectrum = torch.fft.rfft2(images, s=(size, size))
    out: torch.Tensor = torch.fft.irfft2(spectrum * transfer, s=(size, size))
    return out[..., :n, :n]


def apply_ctf(
    images: torch.Tensor,
    pixel_size: float,
    params: CtfParams,
    *,
    pad: int = 2,
    phase_flipped: bool = False,
) -> torch.Tensor:
    """Convolve ``(B, N, N)`` images with their CTFs, computed on a ``pad``-times padded grid.

    This is the forward model of a particle image: ``image = CTF ∗ projection``. For data that
    were phase-flipped (``rlnCtfDataArePhaseFlipped``) the model is ``|CTF| ∗ projection``.
    """
    size = round(pad * images.shape[-1])
    ctf = compute_ctf(size, pixel_size, params.to(images.device, images.dtype))
    if phase_flipped:
        ctf = ctf.abs()
    return filter_images(images, ctf, pad=pad)


def phase_flip(images: torch.Tensor, pixel_size: float, params: CtfParams, *, pad: int = 1) -> torch.Tensor:
    """Phase-flip ``(B, N, N)`` images: multiply their spectra by ``sign(CTF)``."""
    size = round(pad * images.shape[-1])
    ctf = compute_ctf(size, pixel_size, params.to(images.device, images.dtype))
    return filter_images(images, ctf.sign(), pad=pad)


def wiener_filter(
    images: torch.Tensor,
    pixel_size: float,
    params: CtfParams,
    *,
    epsilon: float | None = None,
    pad: int = 1,
) -> torch.Tensor:
    """Wiener-correct ``(B, N, N)`` images: ``F · CTF / (CTF² + ε)``.

    ``ε`` defaults to ``0.1 · mean(CTF²)`` over the batch (Zernike3Deep's choice); pass a number
    (e.g. 1/SNR) to fix it.
    """
    size = round(pad * images.shape[-1])
    ctf = compute_ctf(size, pixel_size, params.to(images.device, images.dtype))
    eps = 0.1 * float((ctf * ctf).mean()) if epsilon is None else float(epsilon)
    return filter_images(images, ctf / (ctf * ctf + eps), pad=pad)
