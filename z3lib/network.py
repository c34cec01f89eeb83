"""Zernike3Deep: an image encoder whose latent space is the Zernike3D coefficients, trained
through a decoder that is physics only (deform → rotate → shift → splat → CTF).

Units inside the network are pixels of the processing box; coefficients leave the module in
pixels of the original particle box (``Rmax = original box / 2``, design.md §5).

Improvements over the original (reference/zernike3d-family.md §1): images stream from the
memory-mapped stack (bounded memory); the image loss is the mean of per-image correlations; the
field regularisers are true field energy and smoothness (quadratic forms on the point cloud, so
they mean the same thing in either basis); points leaving the image are dropped; training is
seeded, checkpointed every epoch and resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from z3lib import zernike as zk
from z3lib.conventions import (
    euler_to_matrix,
    shift_angstrom_to_pixels,
    shift_pixels_to_angstrom,
)
from z3lib.ctf import CtfParams, compute_ctf
from z3lib.decoder import Loss, PhysicalDecoder, Roughness, circle_mask, image_loss
from z3lib.io import ImageStack, Particles
from z3lib.settings import check_choices, from_section

Encoder = Literal["conv", "mlp"]
PREDICT_BATCH_SIZE = 256  # particles encoded at once by :func:`predict` (the pipeline's predict.batch_size)


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

    def __post_init__(self) -> None:
        check_choices(self)

    @classmethod
    def from_config(cls, zernike: Mapping[str, Any], train: Mapping[str, Any], seed: int = 0) -> NetworkConfig:
        """From the pipeline config's ``zernike`` and ``train`` sections and its ``seed``."""
        return from_section(cls, {**zernike, **train}, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NetworkConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown network settings {sorted(unknown)}; known: {sorted(names)}")
        # models saved before the reference could be learned (z3lib < 0.1.3) hold none
        # ... and penalised the full gradient (z3lib < 0.1.4)
        return cls(**{"learn_reference": False, "roughness": "gradient", **values})


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
        self.dense = nn.Sequential(nn.Linear(16 * width + extra, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())

    def forward(self, images: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
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
            nn.Linear(in_channels * box * box + extra, 2 * hidden), nn.SiLU(),
            nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
        )

    def forward(self, images: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        f = images.flatten(1)
        if extra is not None:
            f = torch.cat([f, extra], dim=1)
        out: torch.Tensor = self.net(f)
        return out


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class Zernike3Deep(nn.Module):
    """Encoder → 3K Zernike3D coefficients (+ optional pose corrections) → physical decoder."""

    image_mask: torch.Tensor

    def __init__(self, points: torch.Tensor, amplitudes: torch.Tensor, box: int, pixel_size: float,
                 config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.box = int(box)
        self.n_terms = zk.count_terms(config.L1, config.L2)
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
        self.decoder = PhysicalDecoder(points, amplitudes, box, pixel_size, config)
        self.register_buffer("image_mask", circle_mask(box, config.mask_radius))

    def flip_signs(self, ctf: CtfParams | None, *, phase_flipped: bool = False,
                   device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """``sign(CTF)`` on the (unpadded) rfft grid, ``(B, N, N // 2 + 1)``, that phase-flips the
        encoder's input; None when no flip is due (flipping off, no CTF, or data already flipped)."""
        if not self.config.encoder_phase_flip or ctf is None or phase_flipped:
            return None
        dev = device if device is not None else self.image_mask.device
        return torch.sign(compute_ctf(self.box, self.decoder.pixel_size, ctf.to(dev, dtype)))

    def encoder_input(self, images: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
        """What the encoder sees: the masked image, phase-flipped by ``signs`` (see
        :meth:`flip_signs`; None = as is) and low-passed by Fourier cropping to ``encoder_box`` px,
        scaled to unit variance.

        ``(B, N, N)`` → ``(B, n, n)``.
        """
        x = images * self.image_mask
        if signs is None and self.encoder_box == self.box:
            return x
        spec = torch.fft.rfft2(x)
        if signs is not None:
            spec = spec * signs.to(x.dtype)
        n = self.encoder_box
        if n != self.box:
            half = n // 2
            spec = torch.cat([spec[:, :half, : half + 1], spec[:, self.box - (n - half):, : half + 1]], dim=1)
        out: torch.Tensor = torch.fft.irfft2(spec, s=(n, n))
        return out / out.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)

    def encode(self, images: torch.Tensor, ctf: CtfParams | None = None,
               rotations: torch.Tensor | None = None, shifts: torch.Tensor | None = None, *,
               phase_flipped: bool = False, transfer: torch.Tensor | None = None,
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
        signs = self.flip_signs(ctf, phase_flipped=phase_flipped, device=images.device, dtype=images.dtype)
        x = self.encoder_input(images, signs)
        if self.config.encoder_reference:
            if rotations is None or shifts is None:
                raise ValueError("this model's encoder needs the particles' rotations and shifts")
            with torch.no_grad():
                ref = self.decoder(None, rotations, shifts, ctf, phase_flipped=phase_flipped, transfer=transfer)
            x = torch.stack([x, self.encoder_input(ref, signs)], dim=1)
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
# Particle metadata on the device
# ----------------------------------------------------------------------------------------------
@dataclass
class ParticleBatchSource:
    """Per-particle poses and CTF (small, in memory) and the lazy image stack (on disk)."""

    images: ImageStack
    angles: torch.Tensor  # (n, 3) deg: rot, tilt, psi
    shifts: torch.Tensor  # (n, 2) px of the processing box
    ctf: CtfParams
    pixel_size: float
    phase_flipped: bool = False
    subsets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rows: np.ndarray | None = None  # (n,) stack rows of this source's particles; None = 0…n−1

    @classmethod
    def from_particles(cls, particles: Particles) -> ParticleBatchSource:
        t = particles.table
        if not particles.has_poses:
            raise ValueError(f"{particles.path} has no poses; Zernike3Deep needs a consensus refinement")
        flipped = t["phase_flipped"].to_numpy(dtype=bool)
        if flipped.any() and not flipped.all():
            raise ValueError(f"{particles.path}: mixing phase-flipped and unflipped optics groups is not supported")
        return cls(
            images=particles.images(),
            angles=torch.tensor(t[["rot", "tilt", "psi"]].to_numpy(np.float64), dtype=torch.float32),
            shifts=torch.tensor(t[["shift_x", "shift_y"]].to_numpy(np.float64), dtype=torch.float32),
            ctf=CtfParams.from_table(t),
            pixel_size=particles.pixel_size,
            phase_flipped=bool(flipped.all()),
            subsets=t["random_subset"].to_numpy(np.int64),
        )

    def __len__(self) -> int:
        return int(self.angles.shape[0])

    def take(self, rows: np.ndarray) -> ParticleBatchSource:
        """The particles ``rows`` (indices into this source) as a source of their own: index
        ``i`` of the result is particle ``rows[i]`` here. Nothing outside ``rows`` is ever read
        through it (a gold-standard half trains and refines on its own particles only)."""
        r = np.asarray(rows, dtype=np.int64)
        ti = torch.as_tensor(r)
        stack_rows = r if self.rows is None else self.rows[r]
        return ParticleBatchSource(images=self.images, angles=self.angles[ti], shifts=self.shifts[ti],
                                   ctf=self.ctf[ti], pixel_size=self.pixel_size, phase_flipped=self.phase_flipped,
                                   subsets=self.subsets[r] if len(self.subsets) else self.subsets, rows=stack_rows)

    def batch(self, index: np.ndarray, device: torch.device) -> dict[str, Any]:
        """Images and metadata of the particles ``index`` (sorted reads from the mmap)."""
        order = np.argsort(index, kind="stable")
        imgs = np.empty((len(index), self.images.box, self.images.box), dtype=np.float32)
        stack_index = index if self.rows is None else self.rows[index]
        imgs[order] = self.images[stack_index[order]]
        ti = torch.as_tensor(index)
        return {
            "images": torch.from_numpy(imgs).to(device),
            "angles": self.angles[ti].to(device),
            "shifts": self.shifts[ti].to(device),
            "ctf": self.ctf[ti].to(device),
        }


def _forward_loss(model: Zernike3Deep, batch: dict[str, Any], use_amp: bool) -> tuple[torch.Tensor, dict[str, float]]:
    cfg = model.config
    device = batch["images"].device
    flipped = bool(batch.get("phase_flipped", False))
    rot0 = euler_to_matrix(batch["angles"][:, 0], batch["angles"][:, 1], batch["angles"][:, 2])
    transfer = model.decoder.transfer(batch["ctf"], phase_flipped=flipped)  # once per batch, used twice
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
        coeffs, d_ang, d_shift = model.encode(batch["images"], batch["ctf"], rot0, batch["shifts"],
                                              phase_flipped=flipped, transfer=transfer)
    coeffs, d_ang, d_shift = coeffs.float(), d_ang.float(), d_shift.float()
    if cfg.refine_pose:
        ang = batch["angles"] + d_ang
        rot = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    else:
        rot = rot0  # the pose heads are frozen at zero
    pred = model.decoder(coeffs, rot, batch["shifts"] + d_shift, batch["ctf"], transfer=transfer)
    img = image_loss(pred, batch["images"], model.image_mask, cfg.loss, cfg.frc_radius).mean()
    energy = model.decoder.field_energy(coeffs).mean()
    rough = model.decoder.field_roughness(coeffs).mean()
    pose = (d_ang**2).sum(1).mean() + (d_shift**2).sum(1).mean()
    total = img + cfg.energy_weight * energy + cfg.smooth_weight * rough + cfg.pose_weight * pose
    parts = {"loss": total, "image": img, "energy": energy, "roughness": rough, "pose": pose}
    return total, {k: float(v.detach()) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
CHECKPOINT_NAME = "checkpoint.pt"


def _fingerprint(config: NetworkConfig, n_particles: int, box: int, inputs: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (not ``epochs``: training may be extended).

    ``inputs`` holds digests of the data (particle rows, point cloud) and of the initial weights,
    so that a checkpoint is never resumed for another round, half set or starting model."""
    d = config.to_dict()
    d.pop("epochs")
    return {"config": d, "n_particles": int(n_particles), "box": int(box), "inputs": dict(inputs or {})}


#: The learning rate decays to this fraction of ``NetworkConfig.learning_rate``.
LR_FLOOR = 0.1


def cosine_decay(epochs: int, lr_start: float, floor_ratio: float) -> list[float]:
    """Per-epoch learning rates of a cosine decay from ``lr_start`` towards
    ``floor_ratio · lr_start``: ``lr_e = lr_start · (r + (1 − r)/2 · (1 + cos(π e / epochs)))``
    for ``e = 0 … epochs − 1`` (the first epoch at ``lr_start``; the floor would be the next)."""
    half = (1.0 - floor_ratio) / 2.0
    return [lr_start * (floor_ratio + half * (1 + math.cos(math.pi * (e / max(epochs, 1))))) for e in range(epochs)]


def learning_rate_schedule(learning_rate: float, epochs: int, planned: Sequence[float] | None = None,
                           done: int = 0) -> list[float]:
    """The learning rate of every epoch ``0 … epochs − 1`` (one value per epoch).

    A fresh run (``planned`` None or empty): cosine decay from ``learning_rate`` to
    ``LR_FLOOR · learning_rate`` over ``epochs`` (:func:`cosine_decay`). A resumed run whose
    checkpoint planned ``planned`` and trained its first ``done`` epochs: the same plan when
    ``epochs`` did not change (an interrupted run continues exactly as an uninterrupted one);
    otherwise (``train.epochs`` extended or shortened) the ``done`` epochs keep the rates they
    were trained with and the rest decays from the last of them, as a cosine over the remaining
    epochs towards the same floor, so the rate never jumps up where training resumes.
    """
    floor = LR_FLOOR * learning_rate
    if not planned or done <= 0:
        return cosine_decay(epochs, learning_rate, LR_FLOOR)
    plan = [float(v) for v in planned]
    if len(plan) == epochs:
        return plan
    used = plan[:done]
    if epochs <= done:
        return used[:epochs]
    last = used[-1]
    ratio = min(floor / last, 1.0) if last > 0 else 1.0
    return used + cosine_decay(epochs - done + 1, last, ratio)[1:]


def array_digest(*arrays: np.ndarray | torch.Tensor) -> str:
    """SHA-256 (hex) of the bytes, dtypes and shapes of arrays or tensors (checkpoint fingerprints)."""
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict (names, shapes and values, in name order)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(array_digest(state[name]).encode())
    return h.hexdigest()


def transferable_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learned weights of a saved model that carry over to a model of another point cloud:
    everything but the physical decoder's buffers (points, amplitudes, basis values and the
    regularisers' quadratic forms are computed from the point cloud, not learned; the image mask
    follows the settings)."""
    return {k: v for k, v in state.items() if not k.startswith("decoder.") and k != "image_mask"}


def split_particles(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/validation split of ``n`` particle indices."""
    order = np.random.default_rng([seed, 12345]).permutation(n)
    n_val = round(fraction * n) if n > 1 else 0
    n_val = min(n_val, n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def build_model(points: np.ndarray, amplitudes: np.ndarray, box: int, pixel_size: float,
                config: NetworkConfig, device: torch.device | str = "cpu") -> Zernike3Deep:
    """A freshly initialised (seeded) model for a point cloud in px of the processing box."""
    torch.manual_seed(config.seed)
    model = Zernike3Deep(torch.as_tensor(points, dtype=torch.float32),
                         torch.as_tensor(amplitudes, dtype=torch.float32), box, pixel_size, config)
    return model.to(device)


def _evaluate(model: Zernike3Deep, source: ParticleBatchSource, index: np.ndarray, device: torch.device,
              batch_size: int, use_amp: bool) -> float:
    if len(index) == 0:
        return float("nan")
    model.eval()
    total = 0.0
    with torch.no_grad():
        for lo in range(0, len(index), batch_size):
            sel = index[lo:lo + batch_size]
            b = source.batch(sel, device)
            b["phase_flipped"] = source.phase_flipped
            _, parts = _forward_loss(model, b, use_amp)
            total += parts["image"] * len(sel)
    return total / len(index)


def train_model(
    source: ParticleBatchSource,
    points: np.ndarray,
    amplitudes: np.ndarray,
    box: int,
    config: NetworkConfig,
    *,
    checkpoint_dir: str | Path,
    device: str | torch.device = "cpu",
    log: logging.Logger | None = None,
    on_epoch_end: Any = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    data_digests: dict[str, str] | None = None,
) -> tuple[Zernike3Deep, pd.DataFrame]:
    """Train Zernike3Deep; resumable.

    A checkpoint (model, optimiser, history) is written atomically to
    ``checkpoint_dir/checkpoint.pt`` after every epoch. If one exists for the same data and
    settings, training continues after its last epoch (more epochs in ``config`` extend a
    finished run, the learning rate decaying on from where it stopped: see
    :func:`learning_rate_schedule`; the checkpoint keeps the per-epoch plan); otherwise it
    starts from the seeded initialisation, or from ``init_weights``.

    Parameters
    ----------
    source
        particles at the processing box (poses, CTF, lazy images).
    points, amplitudes
        ``(N, 3)`` px and ``(N,)`` point cloud of the reference.
    on_epoch_end
        optional ``callback(epoch, row)`` after each checkpoint (progress hooks, tests).
    init_weights
        fine-tuning: the learned weights of an earlier model (e.g. the previous round's, see
        :func:`transferable_weights`) loaded over the seeded initialisation. The decoder is built
        from ``points`` and ``amplitudes``; the optimiser is fresh and the learning-rate schedule
        starts again over ``config.epochs``.
    data_digests
        digests of the inputs (particle rows, point cloud) for the checkpoint fingerprint; the
        initial weights' digest is added to it here.

    Returns
    -------
    the model after the last epoch and the training history (one row per epoch). The validation
    loss monitors generalisation to unseen particles; it is not used to pick an epoch, because
    the model's job is to explain the particles it is trained on (an autoencoder of this
    dataset), and at low SNR its image loss keeps rising while the landscape keeps improving.
    """
    from z3lib.io import atomic_path

    logger = log or logging.getLogger(__name__)
    dev = torch.device(device)
    use_amp = dev.type == "cuda"
    model = build_model(points, amplitudes, box, source.pixel_size, config, dev)
    inputs = dict(data_digests or {})
    inputs["points"] = array_digest(np.asarray(points, np.float32), np.asarray(amplitudes, np.float32))
    if init_weights is not None:
        weights = transferable_weights(init_weights)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith("decoder.") and k != "image_mask" for k in missing):
            raise ValueError(f"the initial weights do not fit this network (missing {missing}, unexpected "
                             f"{unexpected}): were they trained with other settings?")
        inputs["init"] = state_digest(weights)
        logger.info("fine-tuning: %d weight tensors loaded from the initial model", len(weights))
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    # per-epoch learning rates (learning_rate_schedule): planned once, kept in the checkpoint
    schedule = learning_rate_schedule(config.learning_rate, config.epochs)
    train_idx, val_idx = split_particles(len(source), config.validation_fraction, config.seed)
    fingerprint = _fingerprint(config, len(source), box, inputs)
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimizer"])
            history = list(state["history"])
            start_epoch = int(state["epoch"])
            # checkpoints from before the schedule was kept: the rates their epochs were trained with
            planned = state.get("lr_schedule") or [float(row["learning_rate"]) for row in history]
            schedule = learning_rate_schedule(config.learning_rate, config.epochs, planned, start_epoch)
            logger.info("resuming from %s after epoch %d", ckpt_path, start_epoch)
            if len(planned) != config.epochs and config.epochs > start_epoch:
                logger.info("train.epochs changed (%d → %d): the learning rate decays from %.3g over the "
                            "remaining %d epochs", len(planned), config.epochs, schedule[start_epoch - 1],
                            config.epochs - start_epoch)
        else:
            logger.warning("ignoring %s: it was made for other data or settings", ckpt_path)
    n_batches = math.ceil(len(train_idx) / config.batch_size)
    total_batches = n_batches * max(config.epochs - start_epoch, 0)
    done_batches = 0
    t_run = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        model.train()
        for group in optimiser.param_groups:
            group["lr"] = schedule[epoch]
        torch.manual_seed(config.seed * 100003 + epoch)
        order = train_idx[np.random.default_rng([config.seed, epoch]).permutation(len(train_idx))]
        t_epoch = time.perf_counter()
        sums: dict[str, float] = {}
        last_log = time.perf_counter()
        for i in range(n_batches):
            sel = order[i * config.batch_size:(i + 1) * config.batch_size]
            b = source.batch(sel, dev)
            b["phase_flipped"] = source.phase_flipped
            loss, parts = _forward_loss(model, b, use_amp)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(sel)
            done_batches += 1
            now = time.perf_counter()
            if now - last_log > 10 or i == n_batches - 1:
                rate = done_batches * config.batch_size / (now - t_run)
                eta = (total_batches - done_batches) * config.batch_size / max(rate, 1e-9)
                logger.info("epoch %d/%d batch %d/%d loss %.4f | %.0f images/s, ETA %.0f s",
                            epoch + 1, config.epochs, i + 1, n_batches, parts["loss"], rate, eta)
                last_log = now
        elapsed = time.perf_counter() - t_epoch
        row = {"epoch": float(epoch + 1)}
        row.update({f"train_{k}": v / len(train_idx) for k, v in sums.items()})
        row["val_image"] = _evaluate(model, source, val_idx, dev, 4 * config.batch_size, use_amp)
        row["seconds"] = elapsed
        row["images_per_s"] = len(train_idx) / elapsed
        row["learning_rate"] = schedule[epoch]
        history.append(row)
        state = {"model": model.state_dict(), "optimizer": optimiser.state_dict(), "epoch": epoch + 1,
                 "history": history, "fingerprint": fingerprint, "lr_schedule": schedule}
        with atomic_path(ckpt_path) as tmp:
            torch.save(state, tmp)
        logger.info("epoch %d done: train %.4f, validation %.4f, %.0f images/s", epoch + 1,
                    row["train_image"], row["val_image"], row["images_per_s"])
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
    return model, pd.DataFrame(history)


def save_model(path: str | Path, model: Zernike3Deep, meta: dict[str, Any]) -> None:
    """Write ``model.pt``: weights, buffers (point cloud included), settings and metadata —
    plain tensors and primitives, loadable with ``torch.load(..., weights_only=True)``."""
    from z3lib.io import atomic_path

    payload = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "config": model.config.to_dict(), "meta": dict(meta), "format": "z3-zernike3deep-1"}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Zernike3Deep, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model` (``weights_only=True``: no code is unpickled)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format") != "z3-zernike3deep-1":
        raise ValueError(f"{path} is not a z3 Zernike3Deep model file")
    config = NetworkConfig.from_dict(payload["config"])
    sd = payload["state_dict"]
    meta = dict(payload["meta"])
    model = Zernike3Deep(sd["decoder.points"], sd["decoder.amplitudes"], int(meta["box"]),
                         float(meta["pixel_size"]), config)
    model.load_state_dict(sd)
    return model.to(device).eval(), meta


def predict_coefficients(model: Zernike3Deep, source: ParticleBatchSource, *, device: str | torch.device = "cpu",
                         batch_size: int = PREDICT_BATCH_SIZE, log: logging.Logger | None = None
                         ) -> dict[str, np.ndarray]:
    """Encode every particle, in order.

    Returns
    -------
    ``coefficients`` ``(n, 3K)`` px of the processing box, ``delta_angles`` ``(n, 3)`` deg and
    ``delta_shifts`` ``(n, 2)`` px of the processing box.
    """
    logger = log or logging.getLogger(__name__)
    dev = torch.device(device)
    model = model.to(dev).eval()
    n = len(source)
    out_c = np.empty((n, 3 * model.n_terms), dtype=np.float64)
    out_a = np.empty((n, 3))
    out_s = np.empty((n, 2))
    t0 = time.perf_counter()
    last = t0
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, min(n, lo + batch_size))
            b = source.batch(idx, dev)
            rot = euler_to_matrix(b["angles"][:, 0], b["angles"][:, 1], b["angles"][:, 2])
            c, a, s = model.encode(b["images"], b["ctf"], rot, b["shifts"], phase_flipped=source.phase_flipped)
            out_c[idx], out_a[idx], out_s[idx] = c.cpu().numpy(), a.cpu().numpy(), s.cpu().numpy()
            now = time.perf_counter()
            if now - last > 10 or idx[-1] == n - 1:
                rate = (idx[-1] + 1) / (now - t0)
                logger.info("predicted %d/%d particles (%.0f/s, ETA %.0f s)", idx[-1] + 1, n, rate,
                            (n - idx[-1] - 1) / rate)
                last = now
    return {"coefficients": out_c, "delta_angles": out_a, "delta_shifts": out_s}


# ----------------------------------------------------------------------------------------------
# File-level entry points (one per workflow rule)
# ----------------------------------------------------------------------------------------------
def select_device(want_gpu: bool, log: logging.Logger | None = None) -> torch.device:
    """``cuda`` when a GPU was requested and one is usable, else ``cpu`` (and the log says why)."""
    logger = log or logging.getLogger(__name__)
    if want_gpu and torch.cuda.is_available():
        dev = torch.device("cuda")
        logger.info("running on the GPU: %s", torch.cuda.get_device_name(dev))
        return dev
    if want_gpu:
        logger.info("no usable CUDA GPU on this machine: running on the CPU (%d threads)", torch.get_num_threads())
    else:
        logger.info("running on the CPU (%d threads)", torch.get_num_threads())
    return torch.device("cpu")


def _data_digests(source: ParticleBatchSource, parts: Particles, rows: np.ndarray, n_all: int) -> dict[str, str]:
    """What a training checkpoint depends on besides the settings and the point cloud: the
    particle rows ``rows`` (of ``n_all``), the poses, shifts, CTF and half-set labels of
    ``source`` (the particles trained on), the identity of their images and the z3lib version."""
    import z3lib
    from z3lib.refine import stack_identity

    t = parts.table.iloc[rows]
    ctf = source.ctf
    return {"rows": array_digest(rows), "n_total": str(n_all), "z3lib": z3lib.__version__,
            "particles": array_digest(source.angles, source.shifts, source.subsets,
                                      *(getattr(ctf, f.name) for f in fields(ctf))),
            "optics": f"{source.pixel_size!r} {source.phase_flipped}",
            "images": stack_identity(t["image_path"].astype(str).tolist(), t["image_index"].to_numpy(np.int64))}


def train(
    particles: str | Path,
    points: str | Path,
    out_dir: str | Path,
    config: NetworkConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    init_model: str | Path | None = None,
    half: int | None = None,
    poses: str | Path | None = None,
    pixel_size: float | None = None,
    image_root: str | Path | None = None,
    log: logging.Logger | None = None,
) -> dict[str, Path]:
    """Train Zernike3Deep on preprocessed particles; write ``model.pt``, ``history.tsv`` and
    ``points.npz`` (the point cloud of ``points`` with the amplitudes the decoder ended with: the
    learned reference with ``config.learn_reference``, else the input's; refinement works
    against it).

    Parameters
    ----------
    particles
        the preprocess stage's ``particles.star`` (processing box).
    points
        its ``points.npz`` (point cloud, amplitudes, boxes and pixel sizes).
    out_dir
        where ``model.pt`` and ``history.tsv`` are written (atomically).
    checkpoint_dir
        resumable checkpoints (default ``out_dir/checkpoint``); a checkpoint is resumed only for
        the same settings, particle rows, point cloud and initial model.
    init_model
        a ``model.pt`` whose learned weights start the training (fine-tuning, e.g. the previous
        refinement round's network); its decoder is rebuilt from ``points``.
    half
        1 or 2: train on that gold-standard half set only (:func:`z3lib.zart.half_sets` with
        ``config.seed``, the split ZART uses), for independent half-set processing; the model
        records its rows (``meta["rows"]``) and never reads another particle's image. None: all.
    poses
        the STAR with the particles' latest poses and CTF (round k ≥ 2: round k−1's refine
        ``particles.star``), same particles and order, original box; training uses them instead
        of the poses of ``particles`` (:func:`z3lib.io.apply_poses`). None: those of ``particles``.
    pixel_size, image_root
        the overrides the preprocess stage used for the original particles, to read ``poses``.

    A checkpoint is resumed only when its fingerprint matches: the settings (but ``epochs``), the
    particle rows, their poses, shifts, CTF and half-set labels, the identity of their images
    (stack paths, indices, file sizes and modification times), the point cloud, the initial
    model and the z3lib version.
    """
    from z3lib.io import apply_poses, read_npz, read_particles, write_npz, write_table
    from z3lib.zart import half_sets

    logger = log or logging.getLogger(__name__)
    out = Path(out_dir)
    parts = read_particles(particles)
    if poses is not None:
        parts = apply_poses(parts, read_particles(poses, pixel_size=pixel_size, image_root=image_root))
        logger.info("poses and CTF of the %d particles from %s", len(parts), poses)
    cloud = read_npz(points)
    box = int(cloud["box"])
    if parts.box != box:
        raise ValueError(f"{particles} holds {parts.box} px images but {points} was made for box {box}")
    source = ParticleBatchSource.from_particles(parts)
    n_all = len(source)
    rows = np.arange(n_all, dtype=np.int64)
    if half is not None:
        if half not in (1, 2):
            raise ValueError(f"half must be 1 or 2, got {half!r}")
        rows = half_sets(source.subsets, config.seed)[half - 1]
        source = source.take(rows)
        logger.info("gold-standard half %d: training on its %d of %d particles only", half, len(rows), n_all)
    init_weights = None
    if init_model is not None:
        payload = torch.load(Path(init_model), map_location="cpu", weights_only=True)
        if payload.get("format") != "z3-zernike3deep-1":
            raise ValueError(f"{init_model} is not a z3 Zernike3Deep model file")
        init_weights = payload["state_dict"]
        logger.info("starting from the weights of %s", init_model)
    logger.info("Zernike3Deep: %d particles, box %d, %d points, (L1, L2) = (%d, %d) %s basis, %s encoder",
                len(source), box, len(cloud["points"]), config.L1, config.L2, config.basis, config.encoder)
    t0 = time.perf_counter()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, history = train_model(source, cloud["points"], cloud["amplitudes"], box, config,
                                 checkpoint_dir=checkpoint_dir or out / "checkpoint", device=device, log=logger,
                                 init_weights=init_weights,
                                 data_digests=_data_digests(source, parts, rows, n_all))
    meta: dict[str, Any] = {"box": box, "pixel_size": float(cloud["pixel_size"]),
                            "original_box": int(cloud["original_box"]),
                            "original_pixel_size": float(cloud["original_pixel_size"]), "n_particles": len(source),
                            "n_total": n_all, "half": 0 if half is None else int(half),
                            "rows": torch.as_tensor(rows)}
    paths = {"model": out / "model.pt", "history": out / "history.tsv", "points": out / "points.npz"}
    save_model(paths["model"], model, meta)
    write_table(paths["history"], history)
    # the reference the fields refer to: the input cloud, with the learned amplitudes if any
    learned = {**cloud, "amplitudes": model.decoder.values().detach().cpu().numpy().astype(np.float32)}
    write_npz(paths["points"], **learned)
    if config.learn_reference:
        start = np.asarray(cloud["amplitudes"], np.float64)
        change = np.linalg.norm(learned["amplitudes"] - start) / max(float(np.linalg.norm(start)), 1e-12)
        logger.info("learned reference: amplitudes changed by %.1f%% (relative L2)", 100 * change)
    logger.info("training done in %.1f s", time.perf_counter() - t0)
    if torch.device(device).type == "cuda":
        logger.info("GPU peak memory %.2f GiB", torch.cuda.max_memory_allocated() / 2**30)
    source.images.close()
    return paths


def predict(
    model_path: str | Path | Sequence[str | Path],
    particles: str | Path,
    original_particles: str | Path,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = PREDICT_BATCH_SIZE,
    pixel_size: float | None = None,
    image_root: str | Path | None = None,
    poses: str | Path | None = None,
    log: logging.Logger | None = None,
) -> dict[str, Path]:
    """Coefficients for every particle; write ``particles.star`` and ``coefficients.npy``.

    The STAR is the user's input STAR (every input column, input row order) plus
    ``zernikeCoefficients`` (3K floats, px of the original box, Rmax = original box / 2), the
    ``data_zernike3d`` block and, with pose refinement, the corrected angles and shifts and the
    Flexutils ``delta_*`` columns. ``coefficients.npy`` is the same ``(n, 3K)`` array.

    Parameters
    ----------
    model_path
        one ``model.pt``, or one per gold-standard half set (independent halves): each model
        then encodes exactly the particle rows it was trained on (its ``meta["rows"]``), and the
        models' rows must cover every particle once.
    particles
        the preprocess stage's STAR (processing box), whose images are encoded.
    original_particles
        the user's STAR or ``.cs`` (same particles, same order) the output STAR is built from.
    pixel_size, image_root
        the overrides the preprocess stage used for ``original_particles`` (and ``poses``).
    poses
        the STAR with the particles' latest poses and CTF (round k ≥ 2: round k−1's refine
        ``particles.star``), same particles and order, original box: the network encodes the
        particles at these poses (:func:`z3lib.io.apply_poses`) and the output STAR carries them
        (plus the network's corrections with pose refinement), so that refinement starts from
        them. None: the poses of ``particles`` and ``original_particles``.
    """
    from z3lib.io import apply_poses, read_particles, write_coefficients, write_particles_star

    logger = log or logging.getLogger(__name__)
    out = Path(out_dir)
    model_paths = [model_path] if isinstance(model_path, (str, Path)) else list(model_path)
    if not model_paths:
        raise ValueError("predict needs at least one model")
    parts = read_particles(particles)
    original = read_particles(original_particles, pixel_size=pixel_size, image_root=image_root)
    if len(parts) != len(original):
        raise ValueError(f"{particles} has {len(parts)} particles but {original_particles} has {len(original)}; "
                         "they must be the same particles in the same order")
    table = None
    if poses is not None:
        latest = read_particles(poses, pixel_size=pixel_size, image_root=image_root)
        parts = apply_poses(parts, latest)
        table = apply_poses(original, latest).table  # written back into the output STAR
        logger.info("poses and CTF of the %d particles from %s", len(parts), poses)
    source = ParticleBatchSource.from_particles(parts)
    n = len(source)
    models = []
    covered = np.zeros(n, dtype=np.int64)
    for path in model_paths:
        net, meta = load_model(path, device)
        if parts.box != int(meta["box"]):
            raise ValueError(f"{particles} holds {parts.box} px images but {path} was trained at box {meta['box']}")
        rows = np.arange(n) if len(model_paths) == 1 else np.asarray(meta.get("rows", np.arange(0)), np.int64)
        if len(model_paths) > 1 and int(meta.get("n_total", -1)) != n:
            raise ValueError(f"{path} was trained on a half set of {meta.get('n_total')} particles, not of the "
                             f"{n} in {particles}")
        covered[rows] += 1
        models.append((net, meta, rows))
    if not np.all(covered == 1):
        raise ValueError(f"the models {[str(p) for p in model_paths]} cover {int((covered > 0).sum())} of {n} "
                         "particles (each must be encoded by exactly one model)")
    model, meta = models[0][0], models[0][1]
    t0 = time.perf_counter()
    pred: dict[str, np.ndarray] = {}
    for net, _, rows in models:
        part = predict_coefficients(net, source if len(models) == 1 else source.take(rows), device=device,
                                    batch_size=batch_size, log=logger)
        for key, values in part.items():
            pred.setdefault(key, np.zeros((n,) + values.shape[1:], dtype=values.dtype))[rows] = values
    elapsed = time.perf_counter() - t0
    logger.info("encoded %d particles in %.1f s (%.0f images/s)", len(source), elapsed, len(source) / max(elapsed, 1e-9))
    box, orig_box = int(meta["box"]), int(meta["original_box"])
    coefficients = zk.rescale_coefficients(pred["coefficients"], box, orig_box)
    columns: dict[str, Any] = {"zernikeCoefficients": coefficients}
    cfg = model.config
    if cfg.refine_pose:
        table = (original.table if table is None else table).copy()
        d_ang = pred["delta_angles"]
        # δ-shifts: px of the processing box → Å → px of the particles as given
        d_shift = shift_angstrom_to_pixels(shift_pixels_to_angstrom(pred["delta_shifts"], float(meta["pixel_size"])),
                                           original.pixel_size)
        for j, name in enumerate(("rot", "tilt", "psi")):
            table[name] = table[name].to_numpy() + d_ang[:, j]
        table["shift_x"] = table["shift_x"].to_numpy() + d_shift[:, 0]
        table["shift_y"] = table["shift_y"].to_numpy() + d_shift[:, 1]
        columns.update({"delta_angle_rot": d_ang[:, 0], "delta_angle_tilt": d_ang[:, 1], "delta_angle_psi": d_ang[:, 2],
                        "delta_shift_x": d_shift[:, 0], "delta_shift_y": d_shift[:, 1]})
    zernike = {"L1": cfg.L1, "L2": cfg.L2, "Rmax": orig_box / 2, "basis": cfg.basis, "box": orig_box}
    paths = {"particles": out / "particles.star", "coefficients": out / "coefficients.npy"}
    write_coefficients(paths["coefficients"], coefficients)
    write_particles_star(paths["particles"], original, columns=columns, zernike=zernike, table=table)
    source.images.close()
    return paths
