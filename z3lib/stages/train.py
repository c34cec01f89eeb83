"""Stage ``train`` (rules ``train`` and ``train_half``): Zernike3Deep trained on the particles.

The preprocessed particles train the network (:func:`z3lib.training.train_model`), written as
``model.pt``, ``history.tsv`` and the point cloud the fields refer to.

It is also a command, for training on several GPUs or machines with ``torchrun`` (one process
per GPU, :mod:`z3lib.distributed`); the rule runs it that way when ``train.processes`` is above 1::

    torchrun --nproc_per_node 4 -m z3lib.stages.train --config config.yaml \
        --particles results/RUN/preprocess/particles.star --points results/RUN/preprocess/points.npz \
        --out results/RUN/rounds/1/train --device cuda
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from z3lib import distributed
from z3lib.io import Particles, release_memory
from z3lib.network import CloudExtras, NetworkConfig, Zernike3Deep, load_weights, save_model
from z3lib.training import ParticleBatchSource, array_digest, stack_identity, train_model


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
    """Train Zernike3Deep on preprocessed particles; write ``model.pt``, ``history.tsv``, ``points.npz``.

    ``points.npz`` is the point cloud of ``points`` with the amplitudes the decoder ended with: the
    learned reference with ``config.learn_reference``, else the input's; refinement works against
    it.

    Parameters
    ----------
    particles
        the preprocess stage's ``particles.star`` (processing box).
    points
        its ``points.npz`` (point cloud, amplitudes, boxes and pixel sizes).
    out_dir
        where ``model.pt`` and ``history.tsv`` are written (atomically).
    config
        The network's settings (``train`` of the config).
    checkpoint_dir
        resumable checkpoints (default ``out_dir/checkpoint``); a checkpoint is resumed only for
        the same settings, particle rows, point cloud and initial model.
    device
        Torch device of the training.
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
    log
        Logger for progress; default this module's.

    Notes
    -----
    A checkpoint is resumed only when its fingerprint matches: the settings (but ``epochs``), the
    particle rows, their poses, shifts, CTF and half-set labels, the identity of their images
    (stack paths, indices, file sizes and modification times), the point cloud, the initial
    model and the z3lib version.
    """
    logger = log or logging.getLogger(__name__)
    out = Path(out_dir)
    parts, cloud, source, rows = _training_particles(
        particles, points, config, half=half, poses=poses, pixel_size=pixel_size, image_root=image_root, log=logger
    )
    box, n_all = int(cloud["box"]), len(parts)
    digests = _data_digests(source, parts, rows, n_all)
    del parts  # no particle table is held while training: the batches read the source's arrays
    release_memory()
    init_weights = None
    if init_model is not None:
        init_weights = load_weights(init_model)
        logger.info("starting from the weights of %s", init_model)
    what = (len(source), box, len(cloud["points"]), config.L1, config.L2, config.basis, config.encoder)
    logger.info("Zernike3Deep: %d particles, box %d, %d points, (L1, L2) = (%d, %d) %s basis, %s encoder", *what)
    t0 = time.perf_counter()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, history = train_model(
        source,
        cloud["points"],
        cloud["amplitudes"],
        box,
        config,
        checkpoint_dir=checkpoint_dir or out / "checkpoint",
        device=device,
        log=logger,
        init_weights=init_weights,
        data_digests=digests,
        extras=CloudExtras.from_cloud(cloud),  # an atomic model's cloud: its Gaussians and pairs
    )
    meta = _model_meta(cloud, len(source), n_all, half, rows)
    if distributed.context().main:  # with several training processes, rank 0 writes
        paths = _write_training(out, model, history, cloud, meta, logger)
    else:
        paths = {"model": out / "model.pt", "history": out / "history.tsv", "points": out / "points.npz"}
    logger.info("training done in %.1f s", time.perf_counter() - t0)
    if torch.device(device).type == "cuda":
        logger.info("GPU peak memory %.2f GiB", torch.cuda.max_memory_allocated() / 2**30)
    source.images.close()
    return paths


def _training_particles(
    particles: str | Path,
    points: str | Path,
    config: NetworkConfig,
    *,
    half: int | None,
    poses: str | Path | None,
    pixel_size: float | None,
    image_root: str | Path | None,
    log: logging.Logger,
) -> tuple[Particles, dict[str, Any], ParticleBatchSource, np.ndarray]:
    """Read the particles (at their latest ``poses``), the point cloud and the batch source.

    The batch source holds the particles trained on (a gold-standard ``half``, or all); their rows
    ``(n,)`` come with it.
    """
    from z3lib.io import apply_poses, read_npz, read_particles
    from z3lib.zart import half_sets

    parts = read_particles(particles)
    if poses is not None:
        parts = apply_poses(parts, read_particles(poses, pixel_size=pixel_size, image_root=image_root))
        log.info("poses and CTF of the %d particles from %s", len(parts), poses)
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
        log.info("gold-standard half %d: training on its %d of %d particles only", half, len(rows), n_all)
    return parts, cloud, source, rows


def _model_meta(
    cloud: dict[str, Any], n_particles: int, n_total: int, half: int | None, rows: np.ndarray
) -> dict[str, Any]:
    """Return what ``model.pt`` records besides the weights: boxes, pixel sizes, particle rows, half set."""
    return {
        "box": int(cloud["box"]),
        "pixel_size": float(cloud["pixel_size"]),
        "original_box": int(cloud["original_box"]),
        "original_pixel_size": float(cloud["original_pixel_size"]),
        "n_particles": n_particles,
        "n_total": n_total,
        "half": 0 if half is None else int(half),
        "rows": torch.as_tensor(rows),
    }


def _write_training(
    out: Path,
    model: Zernike3Deep,
    history: pd.DataFrame,
    cloud: dict[str, Any],
    meta: dict[str, Any],
    log: logging.Logger,
) -> dict[str, Path]:
    """Write ``model.pt``, ``history.tsv`` and ``points.npz`` under ``out``; return their paths.

    ``points.npz`` is the input cloud with the amplitudes the decoder ended with.
    """
    from z3lib.io import write_npz, write_table

    paths = {"model": out / "model.pt", "history": out / "history.tsv", "points": out / "points.npz"}
    save_model(paths["model"], model, meta)
    write_table(paths["history"], history)
    # the reference the fields refer to: the input cloud, with the learned amplitudes if any
    learned = {**cloud, "amplitudes": model.decoder.values().detach().cpu().numpy().astype(np.float32)}
    write_npz(paths["points"], **learned)
    if model.config.learn_reference:
        start = np.asarray(cloud["amplitudes"], np.float64)
        change = np.linalg.norm(learned["amplitudes"] - start) / max(float(np.linalg.norm(start)), 1e-12)
        log.info("learned reference: amplitudes changed by %.1f%% (relative L2)", 100 * change)
    return paths


def _data_digests(source: ParticleBatchSource, parts: Particles, rows: np.ndarray, n_all: int) -> dict[str, str]:
    """Return what a training checkpoint depends on besides the settings and the point cloud.

    The particle rows ``rows`` (of ``n_all``), the poses, shifts, CTF and half-set labels of
    ``source`` (the particles trained on), the identity of their images and the z3lib version.
    """
    import z3lib

    t = parts.table.iloc[rows]
    ctf = source.ctf
    return {
        "rows": array_digest(rows),
        "n_total": str(n_all),
        "z3lib": z3lib.__version__,
        "particles": array_digest(
            source.angles, source.shifts, source.subsets, *(getattr(ctf, f.name) for f in fields(ctf))
        ),
        "optics": f"{source.pixel_size!r} {source.phase_flipped}",
        "images": stack_identity(t["image_path"].astype(str).tolist(), t["image_index"].to_numpy(np.int64)),
    }


def torchrun_training(
    particles: str | Path,
    points: str | Path,
    out_dir: str | Path,
    settings: dict[str, Any],
    *,
    processes: int,
    device: str | torch.device,
    threads: int,
    log_file: str | Path,
    log: logging.Logger | None = None,
    checkpoint_dir: str | Path | None = None,
    init_model: str | Path | None = None,
    half: int | None = None,
    poses: str | Path | None = None,
    pixel_size: float | None = None,
    image_root: str | Path | None = None,
) -> None:
    """Run :func:`train` as ``processes`` ranks of one machine under ``torchrun`` and wait for them.

    ``settings`` holds the config's ``zernike`` and ``train`` sections and ``seed``. On a CUDA
    ``device`` each rank takes one GPU (NCCL); on the CPU the ranks are gloo processes that share
    ``threads`` cores. The ranks append their log to ``log_file``; rank 0 writes the outputs.
    Raises ``RuntimeError`` (naming the log) when a rank fails.
    """
    import subprocess
    import sys
    import tempfile

    import yaml

    import z3lib

    logger = log or logging.getLogger(__name__)
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.device_count() < processes:
        from z3lib.io import Z3InputError

        raise Z3InputError(
            f"train.processes is {processes} but this job sees {torch.cuda.device_count()} GPU(s): "
            "lower train.processes, or give the rule as many GPUs (resources gpu)"
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    argv = ["--particles", str(particles), "--points", str(points), "--out", str(out_dir), "--device", kind]
    argv += ["--threads", str(threads), "--log-file", str(log_file)]
    options = {
        "--checkpoint-dir": checkpoint_dir,
        "--init-model": init_model,
        "--half": half,
        "--poses": poses,
        "--pixel-size": pixel_size,
        "--image-root": image_root,
    }
    argv += [str(x) for flag, value in options.items() if value is not None for x in (flag, value)]
    root = str(Path(z3lib.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env["OMP_NUM_THREADS"] = str(max(1, threads // processes))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=out_dir, prefix=".settings-") as handle:
        yaml.safe_dump(settings, handle)
        handle.flush()
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = [*launcher, "-m", "z3lib.stages.train", "--config", handle.name, *argv]
        logger.info("torchrun: %d training processes on the %s", processes, "GPUs" if kind == "cuda" else "CPU")
        for handler in logging.getLogger().handlers:
            handler.flush()
        result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        logger.error("torchrun output:\n%s", result.stdout[-5000:])
        raise RuntimeError(f"distributed training failed (exit status {result.returncode}); see {log_file}")


# ----------------------------------------------------------------------------------------------
# Command line (one process, or one rank of a torchrun launch)
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m z3lib.stages.train",
        description="Train Zernike3Deep on preprocessed particles (alone, or as one rank under torchrun).",
    )
    parser.add_argument("--particles", required=True, help="the preprocess stage's particles.star")
    parser.add_argument("--points", required=True, help="its points.npz (or atoms.npz)")
    parser.add_argument("--out", required=True, help="folder of model.pt, history.tsv and points.npz")
    parser.add_argument("--config", help="a z3 config (YAML): its zernike and train sections and seed")
    parser.add_argument("--checkpoint-dir", help="resumable checkpoints (default OUT/checkpoint)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="cuda when usable (default)")
    parser.add_argument("--threads", type=int, help="CPU cores of the job on each machine (default: all)")
    parser.add_argument("--init-model", help="a model.pt to fine-tune (round k >= 2)")
    parser.add_argument("--half", type=int, choices=[1, 2], help="train on this gold-standard half set only")
    parser.add_argument("--poses", help="a STAR with the particles' latest poses and CTF")
    parser.add_argument("--pixel-size", type=float, help="the pixel size override of the original particles (Å)")
    parser.add_argument("--image-root", help="the image root override of the original particles")
    parser.add_argument("--log-file", help="append the log here (default: standard error)")
    return parser


def network_config_from_file(path: str | Path | None) -> NetworkConfig:
    """Return the :class:`NetworkConfig` of a z3 config file's ``zernike`` and ``train`` sections and ``seed``.

    Keys a section leaves out take the defaults; ``None`` gives the defaults.
    """
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys (zernike, train, seed)")
    return NetworkConfig.from_config(values.get("zernike") or {}, values.get("train") or {}, seed=values.get("seed", 0))


def main(argv: list[str] | None = None) -> None:
    """Run :func:`train` from the command line; under ``torchrun``, join its process group first."""
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    fmt = f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s"
    # the other ranks log warnings only: rank 0 reports progress for all
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(filename=args.log_file, level=level, format=fmt)
    log = logging.getLogger("z3.train")
    want_gpu = args.device == "cuda"
    if distributed.launched_by_torchrun():
        _, device = distributed.init_from_environment(want_gpu, args.threads, log)
    else:
        from z3lib.devices import select_device

        if args.threads:
            torch.set_num_threads(args.threads)
        device = select_device(want_gpu, log)
    try:
        written = train(
            args.particles,
            args.points,
            args.out,
            network_config_from_file(args.config),
            checkpoint_dir=args.checkpoint_dir,
            device=device,
            init_model=args.init_model,
            half=args.half,
            poses=args.poses,
            pixel_size=args.pixel_size,
            image_root=args.image_root,
            log=log,
        )
        if rank == 0:
            log.info("wrote %s", ", ".join(sorted(str(p) for p in written.values())))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
