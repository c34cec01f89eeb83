"""Deformed-projection throughput (images/s), forward and forward+backward.

Prints one JSON line per configuration: box 64 and 128; (L1, L2) = (3, 2) in the xmipp basis and
(7, 7) in the orthonormal basis; CPU and, when a usable CUDA device is present, GPU. The point
cloud is every voxel of a ball of radius 0.3·box (a protein-sized mask), batch 32.

Usage: python benchmarks/bench_projection.py [--repeats N] [--batch B] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from z3lib import zernike as zk
from z3lib.geometry import points_from_mask, random_rotations, sphere_mask
from z3lib.projection import project_points


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(box: int, degrees: tuple[int, int], basis: str, device: str, batch: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    pts_np, _ = points_from_mask(sphere_mask(box, 0.3 * box))
    pts = torch.tensor(pts_np, dtype=torch.float32, device=device)
    z = zk.evaluate_basis(pts, *degrees, box / 2, basis)
    amps = torch.rand(len(pts), device=device)
    rots = torch.tensor(random_rotations(batch, rng), dtype=torch.float32, device=device)
    shifts = torch.randn(batch, 2, device=device)
    coeffs = (0.5 * torch.randn(batch, 3 * z.shape[1], device=device)).requires_grad_(True)
    target = torch.randn(batch, box, box, device=device)

    def forward() -> torch.Tensor:
        return project_points(pts, amps, rots, shifts, box, basis=z, coefficients=coeffs)

    for _ in range(2):  # warm-up
        forward().mul(target).sum().backward()
    _sync(device)
    # best of `repeats` timings: the least disturbed by other load on the machine
    t_fwd = t_fb = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            forward()
        _sync(device)
        t_fwd = min(t_fwd, time.perf_counter() - t0)
        t0 = time.perf_counter()
        coeffs.grad = None
        forward().mul(target).sum().backward()
        _sync(device)
        t_fb = min(t_fb, time.perf_counter() - t0)
    cpu = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name() if device == "cuda" else cpu
    return {
        "benchmark": "projection",
        "device": device,
        "device_name": name,
        "box": box,
        "L1": degrees[0],
        "L2": degrees[1],
        "basis": basis,
        "K": int(z.shape[1]),
        "points": len(pts),
        "batch": batch,
        "forward_images_per_s": round(batch / t_fwd, 1),
        "forward_backward_images_per_s": round(batch / t_fb, 1),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    args = parser.parse_args()
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for box in (64, 128):
            for degrees, basis in (((3, 2), "xmipp"), ((7, 7), "orthonormal")):
                row = bench(box, degrees, basis, device, args.batch, args.repeats)
                line = json.dumps(row)
                print(line, flush=True)
                if args.out:
                    with args.out.open("a") as fh:
                        fh.write(line + "\n")


if __name__ == "__main__":
    main()
