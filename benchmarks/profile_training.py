"""Where Zernike3Deep's training time goes: images/s by batch size, and a torch.profiler table.

Trains through the library's own loop (`z3lib.training.train_model`) on the demo simulation at
box 64 for a few epochs per batch size and reports the median images/s of the epochs after the
first; then profiles one epoch at the first batch size and prints the operators with the most
self CPU and self CUDA time. Meant for a GPU machine (``--device cuda``); runs on the CPU too.

Usage: python benchmarks/profile_training.py [--device cuda] [--batch-sizes 32 64 128]
       [--degrees 7,7,orthonormal] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import demo_dataset, emit

from z3lib.io import read_npz, read_particles
from z3lib.network import NetworkConfig
from z3lib.training import ParticleBatchSource, train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--degrees", default="7,7,orthonormal")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = demo_dataset(n=args.n, box=args.box)
    cloud = read_npz(data["pre_points"])
    source = ParticleBatchSource.from_particles(read_particles(data["pre_particles"]))
    l1, l2, basis = args.degrees.split(",")
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} x{torch.get_num_threads()}"

    def run(batch: int, epochs: int, hook: Any = None) -> list[float]:
        cfg = NetworkConfig(L1=int(l1), L2=int(l2), basis=basis, epochs=epochs, batch_size=batch)
        with tempfile.TemporaryDirectory() as tmp:
            _, history = train_model(
                source,
                cloud["points"],
                cloud["amplitudes"],
                int(cloud["box"]),
                cfg,
                checkpoint_dir=tmp,
                device=args.device,
                on_epoch_end=hook,
            )
        return [float(x) for x in history["images_per_s"]]

    for batch in args.batch_sizes:
        rates = run(batch, args.epochs)
        emit(
            {
                "benchmark": "training_throughput",
                "device_name": name,
                "box": args.box,
                "points": len(cloud["points"]),
                "degrees": args.degrees,
                "batch_size": batch,
                "particles": args.n,
                "images_per_s_per_epoch": [round(r) for r in rates],
                "images_per_s": round(float(np.median(rates[1:] if len(rates) > 1 else rates)), 1),
            },
            args.out,
        )
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)

    def hook(epoch: int, _row: dict[str, float]) -> None:  # profile epoch 2 only: not the model's set-up
        if epoch == 1:
            prof.start()
        elif epoch == 2:
            prof.stop()

    run(args.batch_sizes[0], 2, hook)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    if args.device == "cuda":
        print(averages.table(sort_by="self_cuda_time_total", row_limit=15), flush=True)


if __name__ == "__main__":
    main()
