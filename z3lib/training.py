"""Training and prediction of Zernike3Deep (:mod:`z3lib.network`).

Particle batches, the loss, the seeded train/validation split, the learning-rate schedule,
resumable training, evaluation, prediction, and the digests that fingerprint checkpoints and
partial results.

Units are those of the processing box: images ``(B, N, N)``, shifts px, angles deg, coefficients
``(B, 3K)`` px (``Rmax = N / 2``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from z3lib import distributed
from z3lib.conventions import euler_to_matrix
from z3lib.ctf import CtfParams
from z3lib.decoder import image_loss
from z3lib.io import ImageStack, Particles
from z3lib.network import CloudExtras, NetworkConfig, Zernike3Deep, build_model, transferable_weights

# particles encoded at once by :func:`predict_coefficients` (the pipeline's predict.batch_size)
PREDICT_BATCH_SIZE = 256


# ----------------------------------------------------------------------------------------------
# Particle metadata on the device
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParticleBatch:
    """Images and metadata of a batch of ``B`` particles, on one device (processing box)."""

    images: torch.Tensor  # (B, N, N) normalised images
    angles: torch.Tensor  # (B, 3) deg: rot, tilt, psi
    shifts: torch.Tensor  # (B, 2) px
    ctf: CtfParams  # B parameter sets
    phase_flipped: bool = False  # the images are phase-flipped (rlnCtfDataArePhaseFlipped)


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
        """Build the source of a particle set with poses (refused without poses or with mixed phase flips)."""
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
        """Return the particles ``rows`` (indices into this source) as a source of their own.

        Index ``i`` of the result is particle ``rows[i]`` here. Nothing outside ``rows`` is ever read
        through it (a gold-standard half trains and refines on its own particles only).
        """
        r = np.asarray(rows, dtype=np.int64)
        ti = torch.as_tensor(r)
        stack_rows = r if self.rows is None else self.rows[r]
        return ParticleBatchSource(
            images=self.images,
            angles=self.angles[ti],
            shifts=self.shifts[ti],
            ctf=self.ctf[ti],
            pixel_size=self.pixel_size,
            phase_flipped=self.phase_flipped,
            subsets=self.subsets[r] if len(self.subsets) else self.subsets,
            rows=stack_rows,
        )

    def batch(self, index: np.ndarray, device: torch.device) -> ParticleBatch:
        """Images and metadata of the particles ``index`` (sorted reads from the mmap)."""
        order = np.argsort(index, kind="stable")
        imgs = np.empty((len(index), self.images.box, self.images.box), dtype=np.float32)
        stack_index = index if self.rows is None else self.rows[index]
        imgs[order] = self.images[stack_index[order]]
        ti = torch.as_tensor(index)
        return ParticleBatch(
            images=torch.from_numpy(imgs).to(device),
            angles=self.angles[ti].to(device),
            shifts=self.shifts[ti].to(device),
            ctf=self.ctf[ti].to(device),
            phase_flipped=self.phase_flipped,
        )


def _forward_loss(model: Zernike3Deep, batch: ParticleBatch, use_amp: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Compute the training loss of a batch and its parts as floats.

    The loss is the image term + weighted field energy, roughness and pose corrections; the parts
    are ``loss``, ``image``, ``energy``, ``roughness`` and ``pose``.
    """
    cfg = model.config
    device = batch.images.device
    flipped = batch.phase_flipped
    rot0 = euler_to_matrix(batch.angles[:, 0], batch.angles[:, 1], batch.angles[:, 2])
    transfer = model.decoder.transfer(batch.ctf, phase_flipped=flipped)  # once per batch, used twice
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
        coeffs, d_ang, d_shift = model.encode(
            batch.images, batch.ctf, rot0, batch.shifts, phase_flipped=flipped, transfer=transfer
        )
    coeffs, d_ang, d_shift = coeffs.float(), d_ang.float(), d_shift.float()
    if cfg.refine_pose:
        ang = batch.angles + d_ang
        rot = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    else:
        rot = rot0  # the pose heads are frozen at zero
    pred = model.decoder(coeffs, rot, batch.shifts + d_shift, batch.ctf, transfer=transfer)
    img = image_loss(pred, batch.images, model.image_mask, cfg.loss, cfg.frc_radius).mean()
    energy = model.decoder.field_energy(coeffs).mean()
    rough = model.decoder.field_roughness(coeffs).mean()
    pose = (d_ang**2).sum(1).mean() + (d_shift**2).sum(1).mean()
    total = img + cfg.energy_weight * energy + cfg.smooth_weight * rough + cfg.pose_weight * pose
    parts = {"loss": total, "image": img, "energy": energy, "roughness": rough, "pose": pose}
    if cfg.bond_weight > 0 and len(model.decoder.pairs):  # an atomic model's bonds and Cα–Cα links
        bonds = model.decoder.pair_strain(coeffs).mean()
        total = total + cfg.bond_weight * bonds
        parts.update(loss=total, bonds=bonds)
    if cfg.clash_weight > 0 and len(model.decoder.contacts):  # atoms pushed into each other
        clashes = model.decoder.clash_penalty(coeffs).mean()
        total = total + cfg.clash_weight * clashes
        parts.update(loss=total, clashes=clashes)
    return total, {k: float(v.detach()) for k, v in parts.items()}


class _LossStep(torch.nn.Module):
    """The training loss of a batch as a module's forward (what DistributedDataParallel wraps)."""

    def __init__(self, model: Zernike3Deep, use_amp: bool) -> None:
        super().__init__()
        self.model = model
        self.use_amp = use_amp

    def forward(self, batch: ParticleBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Return :func:`_forward_loss` of ``batch``."""
        return _forward_loss(self.model, batch, self.use_amp)


# ----------------------------------------------------------------------------------------------
# Digests (checkpoint and partial-result fingerprints)
# ----------------------------------------------------------------------------------------------
def array_digest(*arrays: Any) -> str:
    """SHA-256 (hex) of the bytes, dtypes and shapes of arrays or tensors (checkpoint fingerprints).

    A :class:`~z3lib.io.FieldRows` (rows read from disk) is hashed a block of rows at a time and
    gives the digest of the array it stands for.
    """
    from z3lib.io.coefficients import FieldRows, row_blocks

    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, FieldRows):  # the bytes of the array it stands for, a block at a time
            dtype, shape, blocks = a.dtype, a.shape, row_blocks(a)
        else:
            arr = np.ascontiguousarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a))
            dtype, shape, blocks = arr.dtype, arr.shape, iter([arr])
        h.update(f"{dtype.str}{shape}".encode())
        for block in blocks:
            h.update(np.ascontiguousarray(block).reshape(-1).view(np.uint8).data)  # no bytes copy
    return h.hexdigest()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict (names, shapes and values, in name order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(array_digest(state[name]).encode())
    return h.hexdigest()


def stack_identity(image_paths: Sequence[str], image_index: np.ndarray) -> str:
    """Return the SHA-256 (hex) naming the images of some particles, without reading them.

    It covers each particle's stack path and index in it (``(n,)``), and the size and modification
    time (ns) of every stack file named (a rewritten stack gets a new identity).
    """
    h = hashlib.sha256()
    paths = [str(p) for p in image_paths]
    h.update(json.dumps(paths).encode())
    h.update(array_digest(np.asarray(image_index, dtype=np.int64)).encode())
    for path in sorted(set(paths)):
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()


CHECKPOINT_NAME = "checkpoint.pt"


def _fingerprint(
    config: NetworkConfig, n_particles: int, box: int, inputs: dict[str, str] | None = None
) -> dict[str, Any]:
    """Return what must match for a checkpoint to be resumed (not ``epochs``: training may be extended).

    ``inputs`` holds digests of the data (particle rows, point cloud) and of the initial weights,
    so that a checkpoint is never resumed for another round, half set or starting model.
    """
    d = config.to_dict()
    d.pop("epochs")
    return {"config": d, "n_particles": int(n_particles), "box": int(box), "inputs": dict(inputs or {})}


#: The learning rate decays to this fraction of ``NetworkConfig.learning_rate``.
LR_FLOOR = 0.1


def cosine_decay(epochs: int, lr_start: float, floor_ratio: float) -> list[float]:
    """Return the per-epoch learning rates of a cosine decay from ``lr_start``.

    The decay runs towards ``floor_ratio · lr_start``:
    ``lr_e = lr_start · (r + (1 − r)/2 · (1 + cos(π e / epochs)))`` for ``e = 0 … epochs − 1`` (the
    first epoch at ``lr_start``; the floor would be the next).
    """
    half = (1.0 - floor_ratio) / 2.0
    return [lr_start * (floor_ratio + half * (1 + math.cos(math.pi * (e / max(epochs, 1))))) for e in range(epochs)]


def learning_rate_schedule(
    learning_rate: float, epochs: int, planned: Sequence[float] | None = None, done: int = 0
) -> list[float]:
    """Return the learning rate of every epoch ``0 … epochs − 1`` (one value per epoch).

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


def split_particles(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/validation split of ``n`` particle indices."""
    order = np.random.default_rng([seed, 12345]).permutation(n)
    n_val = round(fraction * n) if n > 1 else 0
    n_val = min(n_val, n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _evaluate(
    model: Zernike3Deep,
    source: ParticleBatchSource,
    index: np.ndarray,
    device: torch.device,
    batch_size: int,
    use_amp: bool,
) -> float:
    """Mean image term over the particles ``index`` (no gradients; NaN when there are none).

    With several training processes each rank evaluates every ``world``-th particle and the sums
    are exchanged (the same mean on every rank).
    """
    if len(index) == 0:
        return float("nan")
    model.eval()
    ctx = distributed.context()
    mine = index[ctx.rank :: ctx.world]
    total = 0.0
    with torch.no_grad():
        for lo in range(0, len(mine), batch_size):
            sel = mine[lo : lo + batch_size]
            b = source.batch(sel, device)
            _, parts = _forward_loss(model, b, use_amp)
            total += parts["image"] * len(sel)
    return distributed.all_reduce_sum({"image": total}, device)["image"] / len(index)


def _save_checkpoint(
    path: Path,
    model: Zernike3Deep,
    optimiser: torch.optim.Optimizer,
    epochs_done: int,
    history: list[dict[str, float]],
    fingerprint: dict[str, Any],
    schedule: list[float],
) -> None:
    """Write the training state after ``epochs_done`` epochs to ``path`` (atomically; rank 0 only).

    The other training processes wait until it is written.
    """
    from z3lib.io import atomic_path

    if not distributed.context().main:
        distributed.barrier()
        return

    state = {
        "model": model.state_dict(),
        "optimizer": optimiser.state_dict(),
        "epoch": epochs_done,
        "history": history,
        "fingerprint": fingerprint,
        "lr_schedule": schedule,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    distributed.barrier()


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
    on_epoch_end: Callable[[int, dict[str, float]], Any] | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    data_digests: dict[str, str] | None = None,
    extras: CloudExtras | None = None,
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
    box
        Processing box (px).
    config
        The network's settings (degrees, basis, losses, schedule, seed).
    checkpoint_dir
        Folder of ``checkpoint.pt``.
    device
        Torch device of the training.
    log
        Logger for progress; default this module's.
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
    extras
        What an atomic model's cloud adds (:class:`~z3lib.network.CloudExtras`).

    Returns
    -------
    the model after the last epoch and the training history (one row per epoch). The validation
    loss monitors generalisation to unseen particles; it is not used to pick an epoch, because
    the model's job is to explain the particles it is trained on (an autoencoder of this
    dataset), and at low SNR its image loss keeps rising while the landscape keeps improving.
    """
    logger = log or logging.getLogger(__name__)
    dev = torch.device(device)
    use_amp = dev.type == "cuda"
    model = build_model(points, amplitudes, box, source.pixel_size, config, dev, extras)
    inputs = dict(data_digests or {})
    inputs["points"] = array_digest(
        np.asarray(points, np.float32), np.asarray(amplitudes, np.float32), *(extras or CloudExtras()).arrays()
    )
    if init_weights is not None:
        inputs["init"] = _load_initial_weights(model, init_weights, logger)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    train_idx, val_idx = split_particles(len(source), config.validation_fraction, config.seed)
    fingerprint = _fingerprint(config, len(source), box, inputs)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME
    # per-epoch learning rates (learning_rate_schedule): planned once, kept in the checkpoint
    history, start_epoch, schedule = _resume(ckpt_path, fingerprint, model, optimiser, config, dev, logger)
    n_batches = math.ceil(len(train_idx) / config.batch_size)
    progress = _Progress(total=n_batches * max(config.epochs - start_epoch, 0), batch_size=config.batch_size)
    step = _training_step(model, use_amp, config.batch_size, logger)
    for epoch in range(start_epoch, config.epochs):
        model.train()
        for group in optimiser.param_groups:
            group["lr"] = schedule[epoch]
        torch.manual_seed(config.seed * 100003 + epoch)
        order = train_idx[np.random.default_rng([config.seed, epoch]).permutation(len(train_idx))]
        t_epoch = time.perf_counter()
        sums = _train_epoch(step, optimiser, source, order, epoch, config, dev, progress, logger)
        sums = distributed.all_reduce_sum(sums, dev)
        elapsed = time.perf_counter() - t_epoch
        validation = _evaluate(model, source, val_idx, dev, 4 * config.batch_size, use_amp)
        row = _history_row(epoch, sums, len(train_idx), validation, elapsed, schedule[epoch])
        history.append(row)
        _save_checkpoint(ckpt_path, model, optimiser, epoch + 1, history, fingerprint, schedule)
        done = (epoch + 1, row["train_image"], row["val_image"], row["images_per_s"])
        logger.info("epoch %d done: train %.4f, validation %.4f, %.0f images/s", *done)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
    return model, pd.DataFrame(history)


def _history_row(
    epoch: int, sums: dict[str, float], n_train: int, validation: float, seconds: float, learning_rate: float
) -> dict[str, float]:
    """Return one epoch's row of the training history (loss parts per particle, rate, learning rate)."""
    row = {"epoch": float(epoch + 1)}
    row.update({f"train_{k}": v / n_train for k, v in sums.items()})
    row.update(val_image=validation, seconds=seconds, images_per_s=n_train / seconds, learning_rate=learning_rate)
    return row


def _training_step(model: Zernike3Deep, use_amp: bool, batch_size: int, logger: logging.Logger) -> torch.nn.Module:
    """Return the :class:`_LossStep` of ``model``, in DistributedDataParallel with several processes.

    With several processes (torchrun) each global batch is split across the ranks and the
    gradients averaged, so that every step is the one-process step on the same batch.
    """
    ctx = distributed.context()
    if ctx.world > 1:
        per_rank = math.ceil(batch_size / ctx.world)
        logger.info(
            "data parallel: %d processes, %d particles of each batch of %d per process", ctx.world, per_rank, batch_size
        )
    return distributed.wrap(_LossStep(model, use_amp), ctx)


def _load_initial_weights(model: Zernike3Deep, init_weights: dict[str, torch.Tensor], logger: logging.Logger) -> str:
    """Load the :func:`transferable_weights` of ``init_weights`` over ``model``; their digest."""
    weights = transferable_weights(init_weights)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("decoder.") and k != "image_mask" for k in missing):
        raise ValueError(
            f"the initial weights do not fit this network (missing {missing}, unexpected "
            f"{unexpected}): were they trained with other settings?"
        )
    logger.info("fine-tuning: %d weight tensors loaded from the initial model", len(weights))
    return state_digest(weights)


def _resume(
    ckpt_path: Path,
    fingerprint: dict[str, Any],
    model: Zernike3Deep,
    optimiser: torch.optim.Optimizer,
    config: NetworkConfig,
    device: torch.device,
    logger: logging.Logger,
) -> tuple[list[dict[str, float]], int, list[float]]:
    """Load the checkpoint ``ckpt_path`` into ``model`` and ``optimiser`` when its fingerprint matches.

    Returns the history so far, the epochs done and the per-epoch learning rates
    (:func:`learning_rate_schedule`); nothing done and a fresh schedule without a matching
    checkpoint.
    """
    schedule = learning_rate_schedule(config.learning_rate, config.epochs)
    if not ckpt_path.exists():
        return [], 0, schedule
    state = torch.load(ckpt_path, map_location=device, weights_only=True)
    if state.get("fingerprint") != fingerprint:
        logger.warning("ignoring %s: it was made for other data or settings", ckpt_path)
        return [], 0, schedule
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimizer"])
    history = list(state["history"])
    start_epoch = int(state["epoch"])
    # checkpoints from before the schedule was kept: the rates their epochs were trained with
    planned = state.get("lr_schedule") or [float(row["learning_rate"]) for row in history]
    schedule = learning_rate_schedule(config.learning_rate, config.epochs, planned, start_epoch)
    logger.info("resuming from %s after epoch %d", ckpt_path, start_epoch)
    if len(planned) != config.epochs and config.epochs > start_epoch:
        logger.info(
            "train.epochs changed (%d → %d): the learning rate decays from %.3g over the remaining %d epochs",
            len(planned),
            config.epochs,
            schedule[start_epoch - 1],
            config.epochs - start_epoch,
        )
    return history, start_epoch, schedule


@dataclass
class _Progress:
    """Batches done of a run's ``total`` (throughput and ETA in the log)."""

    total: int
    batch_size: int
    done: int = 0
    start: float = field(default_factory=time.perf_counter)


def _train_epoch(
    step: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    source: ParticleBatchSource,
    order: np.ndarray,
    epoch: int,
    config: NetworkConfig,
    device: torch.device,
    progress: _Progress,
    logger: logging.Logger,
) -> dict[str, float]:
    """Train one pass over the particles ``order`` in batches of ``config.batch_size``.

    ``step`` is the :class:`_LossStep` (wrapped in DistributedDataParallel with several
    processes: this rank then reads and encodes only its share of each batch,
    :func:`z3lib.distributed.shard`). One optimiser step per batch. Returns this rank's loss
    parts summed over its particles (:func:`_forward_loss`).
    """
    ctx = distributed.context()
    n_batches = math.ceil(len(order) / config.batch_size)
    sums: dict[str, float] = {}
    last_log = time.perf_counter()
    for i in range(n_batches):
        sel = order[i * config.batch_size : (i + 1) * config.batch_size]
        mine = distributed.shard(sel, ctx)
        weight = distributed.shard_weight(sel, ctx)
        b = source.batch(mine, device)
        loss, parts = step(b)
        optimiser.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        optimiser.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * len(mine) * (weight > 0)
        progress.done += 1
        now = time.perf_counter()
        if ctx.main and (now - last_log > 10 or i == n_batches - 1):
            rate = progress.done * config.batch_size / (now - progress.start)
            eta = (progress.total - progress.done) * config.batch_size / max(rate, 1e-9)
            logger.info(
                "epoch %d/%d batch %d/%d loss %.4f | %.0f images/s, ETA %.0f s",
                epoch + 1,
                config.epochs,
                i + 1,
                n_batches,
                parts["loss"],
                rate,
                eta,
            )
            last_log = now
    return sums


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------
def predict_coefficients(
    model: Zernike3Deep,
    source: ParticleBatchSource,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = PREDICT_BATCH_SIZE,
    log: logging.Logger | None = None,
    coefficients_out: Any = None,
) -> dict[str, np.ndarray]:
    """Encode every particle, in order.

    Returns
    -------
    ``coefficients`` ``(n, 3K)`` px of the processing box, ``delta_angles`` ``(n, 3)`` deg and
    ``delta_shifts`` ``(n, 2)`` px of the processing box. With ``coefficients_out`` (anything
    that takes ``out[rows] = (B, 3K)``, such as a
    :class:`~z3lib.io.coefficients.CoefficientWriter`) each batch's coefficients go there as
    they are made, and the result holds no ``coefficients``.
    """
    logger = log or logging.getLogger(__name__)
    dev = torch.device(device)
    model = model.to(dev).eval()
    n = len(source)
    out_c = np.empty((n, 3 * model.n_terms), dtype=np.float64) if coefficients_out is None else coefficients_out
    out_a = np.empty((n, 3))
    out_s = np.empty((n, 2))
    t0 = time.perf_counter()
    last = t0
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, min(n, lo + batch_size))
            b = source.batch(idx, dev)
            rot = euler_to_matrix(b.angles[:, 0], b.angles[:, 1], b.angles[:, 2])
            c, a, s = model.encode(b.images, b.ctf, rot, b.shifts, phase_flipped=source.phase_flipped)
            out_c[idx], out_a[idx], out_s[idx] = c.cpu().numpy(), a.cpu().numpy(), s.cpu().numpy()
            now = time.perf_counter()
            if now - last > 10 or idx[-1] == n - 1:
                rate = (idx[-1] + 1) / (now - t0)
                logger.info(
                    "predicted %d/%d particles (%.0f/s, ETA %.0f s)", idx[-1] + 1, n, rate, (n - idx[-1] - 1) / rate
                )
                last = now
    result = {"delta_angles": out_a, "delta_shifts": out_s}
    return result if coefficients_out is not None else {"coefficients": out_c, **result}
