"""Zernike3Deep: an image encoder whose latent space is the Zernike3D coefficients.

The latent vector is decoded by the physical forward model (:mod:`z3lib.decoder`: deform →
rotate → shift → splat → CTF).

This module holds the network itself: its settings (:class:`NetworkConfig`), the encoders, the
:class:`Zernike3Deep` module and its model files. Training, evaluation and prediction are
:mod:`z3lib.training`; the file-level entry points are :mod:`z3lib.stages.train` and
:mod:`z3lib.stages.predict`.

Units inside the network are pixels of the processing box; coefficients leave the module in
pixels of the original particle box (``Rmax = original box / 2``, docs/conventions.md).

Improvements over the original (docs/algorithms.md §4): images stream from the
memory-mapped stack (bounded memory); the image loss is the mean of per-image correlations; the
field regularisers are true field energy and smoothness (quadratic forms on the point cloud, so
they mean the same thing in either basis); points leaving the image are dropped; training is
seeded, checkpointed every epoch and resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from z3lib import zernike as zk
from z3lib.ctf import CtfParams, compute_ctf
from z3lib.decoder import CoarseReference, Loss, PhysicalDecoder, Roughness, circle_mask
from z3lib.settings import check_choices, from_section

Encoder = Literal["conv", "mlp"]
#: The ``format`` of a ``model.pt`` written by :func:`save_model`.
MODEL_FORMAT = "z3-zernike3deep-2"


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class NetworkConfig:
    """Every setting of a Zernike3Deep model and its training (stored inside ``model.pt``).

    The defaults are the pipeline's (``zernike`` and ``train`` of the config schema; a test keeps
    them equal); the settings the pipeline does not expose are the architecture's.
    """

    L1: int = 7
    L2: int = 7
    basis: zk.Basis = "orthonormal"
    encoder: Encoder = "conv"
    encoder_box: int = 32  # encoder input low-passed by Fourier cropping to this box (0 = full box)
    encoder_phase_flip: bool = True  # encoder input multiplied by sign(CTF): no contrast inversions
    encoder_reference: bool = True  # 2nd input channel: the reference projected at the particle's pose
    encoder_pose: bool = True  # the particle's rotation matrix is an input of the dense layers
    channels: int = 16  # first conv layer width (conv encoder)
    hidden: int = 256  # width of the fully connected layers
    refine_pose: bool = False  # predict δ-angles (deg) and δ-shifts (px)
    loss: Loss = "corr"
    frc_radius: float = 0.85  # FRC loss: fraction of Nyquist
    ctf_pad: int = 2
    energy_weight: float = 1e-3  # mean |d|² over the points (px²)
    smooth_weight: float = 0.1  # mean roughness of the field over the points (see ``roughness``)
    roughness: Roughness = "strain"  # "strain": |sym ∇d|² (rigid motions free) | "gradient": |∇d|²
    pose_weight: float = 1e-3  # mean δ-angle² (deg²) + δ-shift² (px²)
    coefficient_scale: float = 1.0  # px per unit of the coefficient head's output
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 2e-3
    validation_fraction: float = 0.1
    seed: int = 0
    mask_radius: float = 0.9  # image circle (fraction of box / 2) seen by the encoder and the loss
    learn_reference: bool = True  # the point cloud's amplitudes are learned with the fields
    bond_weight: float = 0.0  # atoms: mean squared change of bond and Cα–Cα lengths (px²)
    clash_weight: float = 0.0  # atoms: mean squared approach of non-bonded contacts below 2.2 Å (px²)

    def __post_init__(self) -> None:
        check_choices(self)

    @classmethod
    def from_config(cls, zernike: Mapping[str, Any], train: Mapping[str, Any], seed: int = 0) -> NetworkConfig:
        """From the pipeline config's ``zernike`` and ``train`` sections and its ``seed``."""
        # zernike.points (voxels or atoms) picks the point cloud the stage reads, not a setting;
        # train.processes is how many processes run the same training (z3lib.distributed)
        return from_section(cls, {**zernike, **train}, seed=seed, ignore={"points", "processes"})

    def zernike_spec(self, box: int) -> zk.ZernikeSpec:
        """Return the network's Zernike3D basis on ``box`` px (the processing box)."""
        return zk.ZernikeSpec(self.L1, self.L2, self.basis, box)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a plain dict (as saved in ``model.pt``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NetworkConfig:
        # models saved before the reference could be learned (z3lib < 0.1.3) hold none
        # ... and penalised the full gradient (z3lib < 0.1.4)
        """Build the settings from :meth:`to_dict`'s dict, filling in what older model files lack."""
        return from_section(cls, {"learn_reference": False, "roughness": "gradient", **values})


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------
class ConvEncoder(nn.Module):
    """Strided convolutions down to ≤ 8 px, average-pooled to 4×4, then two dense layers.

    ``(B, N, N)`` images → ``(B, hidden)`` features.
    """

    def __init__(self, box: int, channels: int, hidden: int, in_channels: int = 1, extra: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 5, stride=2, padding=2), nn.SiLU()]
        size, width = (box + 1) // 2, channels
        while size > 8:
            out = min(width * 2, 8 * channels)
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.SiLU()]
            size, width = (size + 1) // 2, out
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.dense = nn.Sequential(
            nn.Linear(16 * width + extra, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )

    def forward(self, images: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``(B, N, N)`` (or ``(B, C, N, N)``) images into ``(B, hidden)`` features.

        ``extra``: optional ``(B, extra)`` inputs joined to the image features.
        """
        x = images if images.dim() == 4 else images.unsqueeze(1)
        f = self.features(x)
        if extra is not None:
            f = torch.cat([f, extra], dim=1)
        out: torch.Tensor = self.dense(f)
        return out


class MlpEncoder(nn.Module):
    """Flattened image → three dense ReLU layers. ``(B, N, N)`` → ``(B, hidden)``."""

    def __init__(self, box: int, hidden: int, in_channels: int = 1, extra: int = 0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_channels * box * box + extra, 2 * hidden),
            nn.SiLU(),
            nn.Linear(2 * hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
        )

    def forward(self, images: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``(B, N, N)`` (or ``(B, C, N, N)``) images into ``(B, hidden)`` features.

        ``extra``: optional ``(B, extra)`` inputs joined to the image features.
        """
        f = images.flatten(1)
        if extra is not None:
            f = torch.cat([f, extra], dim=1)
        out: torch.Tensor = self.net(f)
        return out


def _lowest_frequencies(spectrum: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, N, N // 2 + 1)`` rfft grid → its ``(B, n, n // 2 + 1)`` lowest frequencies (Fourier crop)."""
    half, box = n // 2, spectrum.shape[1]
    return torch.cat([spectrum[:, :half, : half + 1], spectrum[:, box - (n - half) :, : half + 1]], dim=1)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CloudExtras:
    """What an atomic model's point cloud adds to the decoder (``atoms.npz``, :mod:`z3lib.atoms`).

    Attributes
    ----------
    blur_px
        σ (px) of the atoms' Gaussians.
    pairs
        ``(M, 2)`` bonds and Cα–Cα links (``train.bond_weight``).
    smooth_points
        ``(N', 3)`` px: the mask's voxels, where the field regularisers are averaged.
    contacts
        ``(R, 2)`` atom pairs more than two bonds apart within 4 Å (``train.clash_weight``).
    """

    blur_px: float = 0.0
    pairs: np.ndarray | None = None
    smooth_points: np.ndarray | None = None
    contacts: np.ndarray | None = None

    @classmethod
    def from_cloud(cls, cloud: Mapping[str, Any]) -> CloudExtras:
        """From a point-cloud ``.npz`` as read (a map's voxels have none of these keys)."""
        return cls(
            blur_px=float(cloud["blur_px"]) if "blur_px" in cloud else 0.0,
            pairs=cloud.get("pairs"),
            smooth_points=cloud.get("smooth_points"),
            contacts=cloud.get("contacts"),
        )

    def decoder_arguments(self) -> dict[str, Any]:
        """Return the keyword arguments of :class:`~z3lib.decoder.PhysicalDecoder` (tensors)."""

        def tensor(values: np.ndarray | torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if values is None else torch.as_tensor(values, dtype=dtype)

        return {
            "blur_px": self.blur_px,
            "pairs": tensor(self.pairs, torch.long),
            "smooth_points": tensor(self.smooth_points, torch.float32),
            "contacts": tensor(self.contacts, torch.long),
        }

    def arrays(self) -> list[np.ndarray]:
        """Return everything as arrays (for fingerprints)."""
        rest = [np.asarray(v) for v in (self.pairs, self.smooth_points, self.contacts) if v is not None]
        return [np.asarray([self.blur_px]), *rest]


class Zernike3Deep(nn.Module):
    """Encoder → 3K Zernike3D coefficients (+ optional pose corrections) → physical decoder."""

    image_mask: torch.Tensor
    encoder_mask: torch.Tensor  # the image circle at the encoder's size (with the reference channel)

    def __init__(
        self,
        points: torch.Tensor,
        amplitudes: torch.Tensor,
        box: int,
        pixel_size: float,
        config: NetworkConfig,
        extras: CloudExtras | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.box = int(box)
        self.n_terms = config.zernike_spec(box).n_terms
        self.encoder_box = min(config.encoder_box, box) if config.encoder_box > 0 else box
        in_ch = 2 if config.encoder_reference else 1
        extra = 9 if config.encoder_pose else 0
        if config.encoder == "conv":
            self.encoder: nn.Module = ConvEncoder(self.encoder_box, config.channels, config.hidden, in_ch, extra)
        else:  # "mlp" (NetworkConfig checks its choices)
            self.encoder = MlpEncoder(self.encoder_box, config.hidden, in_ch, extra)
        self.coefficient_head = nn.Linear(config.hidden, 3 * self.n_terms)
        nn.init.normal_(self.coefficient_head.weight, std=1e-3)
        nn.init.zeros_(self.coefficient_head.bias)
        self.angle_head = nn.Linear(config.hidden, 3)
        self.shift_head = nn.Linear(config.hidden, 2)
        for head in (self.angle_head, self.shift_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            head.requires_grad_(config.refine_pose)
        self.decoder = PhysicalDecoder(
            points,
            amplitudes,
            config.zernike_spec(box),
            pixel_size,
            config,
            **(extras or CloudExtras()).decoder_arguments(),
        )
        self.register_buffer("image_mask", circle_mask(box, config.mask_radius))
        self.reference: CoarseReference | None = None
        if config.encoder_reference:
            self.reference = CoarseReference(self.decoder, self.encoder_box)
            self.register_buffer("encoder_mask", circle_mask(self.encoder_box, config.mask_radius), persistent=False)

    def flip_signs(
        self,
        ctf: CtfParams | None,
        *,
        phase_flipped: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor | None:
        """Return ``sign(CTF)`` on the (unpadded) rfft grid, ``(B, N, N // 2 + 1)``, or None.

        The signs phase-flip the encoder's input; None when no flip is due (flipping off, no CTF, or
        data already flipped).
        """
        if not self.config.encoder_phase_flip or ctf is None or phase_flipped:
            return None
        dev = device if device is not None else self.image_mask.device
        return torch.sign(compute_ctf(self.box, self.decoder.pixel_size, ctf.to(dev, dtype)))

    def encoder_input(self, images: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
        """Return what the encoder sees: the masked, phase-flipped, Fourier-cropped image.

        The masked image is phase-flipped by ``signs`` (see :meth:`flip_signs`; None = as is),
        low-passed by Fourier cropping to ``encoder_box`` px and scaled to unit variance.

        ``(B, N, N)`` → ``(B, n, n)``. Images already at ``n`` px (the reference channel,
        :class:`~z3lib.decoder.CoarseReference`) are masked by the image circle at that size and
        flipped by the same signs at their frequencies.
        """
        n = self.encoder_box
        coarse = n != self.box and images.shape[-1] == n
        x = images * (self.encoder_mask if coarse else self.image_mask)
        if signs is None and (coarse or n == self.box):
            return x if n == self.box else x / x.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)
        spec = torch.fft.rfft2(x)
        if signs is not None:
            # the fine grid's lowest frequencies are the coarse grid's
            spec = spec * (_lowest_frequencies(signs, n) if coarse else signs).to(x.dtype)
        if n != self.box and not coarse:
            spec = _lowest_frequencies(spec, n)
        out: torch.Tensor = torch.fft.irfft2(spec, s=(n, n))
        return out / out.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)

    def encode(
        self,
        images: torch.Tensor,
        ctf: CtfParams | None = None,
        rotations: torch.Tensor | None = None,
        shifts: torch.Tensor | None = None,
        *,
        phase_flipped: bool = False,
        transfer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode particles.

        Parameters
        ----------
        images
            ``(B, N, N)`` normalised particle images.
        ctf, rotations, shifts
            their CTFs, ``(B, 3, 3)`` RELION matrices and ``(B, 2)`` shifts (px): with
            ``encoder_reference`` the encoder also sees the undeformed reference projected with
            them (what the image would be without deformation), and with ``encoder_pose`` the
            rotation itself, so it only has to explain the difference.
        phase_flipped
            the images were phase-flipped (``rlnCtfDataArePhaseFlipped``): they are not flipped
            again, and the reference is projected with ``|CTF|`` like them.
        transfer
            the batch's :meth:`PhysicalDecoder.transfer`, if already computed.

        Returns
        -------
        coefficients ``(B, 3K)`` px, δ-angles ``(B, 3)`` deg, δ-shifts ``(B, 2)`` px (zeros unless
        pose refinement is on).
        """
        pad = self.decoder.ctf_pad
        if transfer is None and ctf is not None and self.reference is not None:
            transfer = self.decoder.transfer(ctf, phase_flipped=phase_flipped, dtype=images.dtype, device=images.device)
        if transfer is not None and self.config.encoder_phase_flip and not phase_flipped and not self.decoder.blurred:
            # the batch's CTFs on the padded grid hold the unpadded grid's at every pad-th
            # frequency (k / (pad·N) = j / N for k = pad·j): the same values, no second evaluation
            signs: torch.Tensor | None = torch.sign(transfer[:, ::pad, ::pad])
        else:
            signs = self.flip_signs(ctf, phase_flipped=phase_flipped, device=images.device, dtype=images.dtype)
        x = self.encoder_input(images, signs)
        if self.reference is not None:
            if rotations is None or shifts is None:
                raise ValueError("this model's encoder needs the particles' rotations and shifts")
            with torch.no_grad():
                # filtered as the particle was (by its CTF; no CTF: the atoms' blur, if any), then
                # seen as the particle is: masked, flipped
                filt = self.decoder.blur_transfer(images.dtype, images.device) if transfer is None else transfer
                ref = self.reference(self.decoder.values(), rotations, shifts, filt)
            x = torch.stack([x, self.encoder_input(ref.to(x.dtype), signs)], dim=1)
        extra = None
        if self.config.encoder_pose:
            if rotations is None:
                raise ValueError("this model's encoder needs the particles' rotations")
            extra = rotations.reshape(-1, 9).to(x.dtype)
        h = self.encoder(x, extra)
        coefficients = self.coefficient_head(h).float() * self.config.coefficient_scale
        if self.config.refine_pose:
            return coefficients, self.angle_head(h).float(), self.shift_head(h).float()
        zeros = coefficients.new_zeros(coefficients.shape[0], 1)
        return coefficients, zeros.expand(-1, 3), zeros.expand(-1, 2)


# ----------------------------------------------------------------------------------------------
# Building, saving and loading
# ----------------------------------------------------------------------------------------------
def transferable_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the learned weights of a saved model that carry over to a model of another point cloud.

    Everything but the physical decoder's buffers (points, amplitudes, basis values and the
    regularisers' quadratic forms are computed from the point cloud, not learned; the image mask
    follows the settings).
    """
    return {k: v for k, v in state.items() if not k.startswith("decoder.") and k != "image_mask"}


def build_model(
    points: np.ndarray,
    amplitudes: np.ndarray,
    box: int,
    pixel_size: float,
    config: NetworkConfig,
    device: torch.device | str = "cpu",
    extras: CloudExtras | None = None,
) -> Zernike3Deep:
    """Build a freshly initialised (seeded) model for a point cloud in px of the processing box.

    ``extras``: what an atomic model's cloud adds (:class:`CloudExtras`).
    """
    torch.manual_seed(config.seed)
    model = Zernike3Deep(
        torch.as_tensor(points, dtype=torch.float32),
        torch.as_tensor(amplitudes, dtype=torch.float32),
        box,
        pixel_size,
        config,
        extras,
    )
    return model.to(device)


def save_model(path: str | Path, model: Zernike3Deep, meta: dict[str, Any]) -> None:
    """Write ``model.pt``: weights, buffers (point cloud included), settings and metadata.

    Plain tensors and primitives only, loadable with ``torch.load(..., weights_only=True)``.
    """
    from z3lib.io import atomic_path

    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "meta": dict(meta),
        "format": MODEL_FORMAT,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Zernike3Deep, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model` (``weights_only=True``: no code is unpickled)."""
    payload = _read_model_file(path)
    config = NetworkConfig.from_dict(payload["config"])
    sd = payload["state_dict"]
    meta = dict(payload["meta"])
    model = Zernike3Deep(
        sd["decoder.points"],
        sd["decoder.amplitudes"],
        int(meta["box"]),
        float(meta["pixel_size"]),
        config,
        CloudExtras(
            blur_px=float(sd["decoder.blur"]) if "decoder.blur" in sd else 0.0,
            pairs=sd.get("decoder.pairs"),
            contacts=sd.get("decoder.contacts"),
        ),
    )
    # files of z3lib < 0.1.8 lack these
    sd = {
        **sd,
        **{
            f"decoder.{k}": getattr(model.decoder, k) for k in ("blur", "pairs", "contacts") if f"decoder.{k}" not in sd
        },
    }
    model.load_state_dict(sd)
    return model.to(device).eval(), meta


def _read_model_file(path: str | Path) -> dict[str, Any]:
    """Read the payload of a ``model.pt`` (``weights_only=True``: no code is unpickled)."""
    payload: dict[str, Any] = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format") == "z3-zernike3deep-1":
        raise ValueError(
            f"{path} was trained by z3lib < 0.1.11, whose encoder saw the reference projected at the"
            " full box; this version's encoder sees it projected on its own grid. Train again"
            " (delete the file, or the run's train/ folder, and rerun)"
        )
    if payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a z3 Zernike3Deep model file")
    return payload


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Return the state dict (weights and buffers, on the CPU) of a model saved by :func:`save_model`."""
    state: dict[str, torch.Tensor] = _read_model_file(path)["state_dict"]
    return state
