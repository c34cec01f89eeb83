"""Simulation throughput: the demo simulator (AdK motion, CTF, noise) at 5,000 particles, box 64.

Prints one JSON line: particles/s and wall time of `z3lib.stages.simulate.simulate_dataset` (files written).
Usage: python benchmarks/bench_simulate.py [--n 5000] [--box 64] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from z3lib.stages.simulate import simulate_dataset

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        simulate_dataset(
            tmp,
            start_model=ROOT / "resources/demo/adk_closed.pdb",
            end_model=ROOT / "resources/demo/adk_open.pdb",
            n_particles=args.n,
            box=args.box,
            pixel_size=2.0,
            resolution=5.0,
            snr=0.1,
            seed=0,
        )
        wall = time.perf_counter() - t0
    row = {
        "benchmark": "simulate",
        "particles": args.n,
        "box": args.box,
        "wall_s": round(wall, 2),
        "particles_per_s": round(args.n / wall, 1),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(row))
    if args.out:
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
