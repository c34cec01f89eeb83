"""Zernike3Deep quality and speed on the demo simulation, against ground truth.

5,000 AdK particles at box 64 (2 Å/px), SNR 0.1, trained and predicted by the library entry
points (`z3lib.stages.train` / `z3lib.stages.predict`), at (L1, L2) = (3, 2) and at higher degrees. Prints one
JSON line per setting: |Spearman| of PC1 vs the true motion coordinate t, k-NN R² of t, RMS error of
predicted vs true atom displacements (Å) next to the zero field and the representation limit,
training and prediction images/s, wall time and peak memory.

Usage: python benchmarks/bench_zernike3deep.py [--settings 3,2,xmipp 5,3,xmipp 7,7,orthonormal]
       [--epochs 20] [--device cpu|cuda] [--box 64] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import logging
import platform
from pathlib import Path

import torch
from common import (
    demo_dataset,
    displacement_metrics,
    emit,
    landscape_metrics,
    network_run,
    peak_memory_mb,
)

from z3lib.io import read_coefficients, read_table
from z3lib.network import NetworkConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["3,2,xmipp", "5,3,xmipp", "7,7,orthonormal"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = demo_dataset(n=args.n, box=args.box)
    t = read_table(data["sim_ground_truth"])["t"].to_numpy()
    for setting in args.settings:
        l1, l2, basis = setting.split(",")
        cfg = NetworkConfig(
            L1=int(l1),
            L2=int(l2),
            basis=basis,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            energy_weight=1e-3,
            smooth_weight=1e-2,
        )
        # trained afresh (this is the timing), into the content-keyed cache that the other
        # benchmarks read when their data, settings and code are the same
        run = network_run(data, cfg, args.device, fresh=True)
        t_train, t_pred = float(run["train_s"]), float(run["predict_s"])
        history = read_table(run["history"])
        coeffs = read_coefficients(run["coefficients"])
        row = {
            "benchmark": "zernike3deep",
            "L1": int(l1),
            "L2": int(l2),
            "basis": basis,
            "particles": args.n,
            "box": args.box,
            "snr": 0.1,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "device": args.device,
            "device_name": torch.cuda.get_device_name()
            if args.device == "cuda"
            else f"{platform.machine()} x{torch.get_num_threads()} threads",
        }
        row.update(landscape_metrics(coeffs, t))
        row.update(displacement_metrics(coeffs, t, data["sim_motion"], (int(l1), int(l2)), basis, args.box))
        row.update(
            {
                "train_images_per_s": round(float(history["images_per_s"].median()), 1),
                "train_wall_s": round(t_train, 1),
                "predict_images_per_s": round(args.n / t_pred, 1),
                "predict_wall_s": round(t_pred, 1),
                "peak_memory_mb": peak_memory_mb(),
            }
        )
        emit(row, args.out)


if __name__ == "__main__":
    main()
