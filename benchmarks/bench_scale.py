"""Data larger than memory: up to 100,000 box-128 particles streamed through the pipeline's stages.

The stack (≈ 6.5 GB at 100,000) is written once, in chunks: a 2,000-particle simulation of the
demo's AdK motion (z3's renderer, box 128, 1.1 Å/px, SNR 0.1, its consensus map and mask made
from the noisy particles) repeated with fresh Gaussian noise on every copy; poses and CTFs go
with the images. For each size (the first ``n`` rows) every stage runs in a process of its own,
as the workflow runs it, through the library's stage functions: preprocess (box 128 → 64),
train (``--epochs``), predict, refine (``--refine-steps``, a 9-point landscape grid, the network's
principal directions; scattered as the workflow scatters it, one process per chunk of at most
``--refine-chunk`` particles, then the gather; ``--refine-chunks-run K`` runs only the first K
chunk processes and no gather) and ZART (``--zart-iterations``, field scale 1, numpy; the refined
fields, or the predicted ones where no refinement was gathered: the cost is the same).
Each prints one JSON line: wall time, particles/s and the peak resident memory of its process
(``VmHWM``, MB). Training also reports the share of its epoch spent reading
batches from the memory-mapped stack.

Usage: python benchmarks/bench_scale.py [--sizes 10000 50000 100000] [--stages preprocess train
       predict refine zart] [--epochs 1] [--refine-steps 10] [--refine-chunk 10000]
       [--refine-chunks-run K] [--zart-iterations 1] [--stack 100000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, WORK, emit

SCALE = WORK / "scale"
BASE_N, BOX, PIXEL = 2000, 128, 1.1
STAGES = ["preprocess", "train", "predict", "refine", "zart"]


def make_stack(n_max: int) -> Path:
    """Write (once) the ``n_max``-particle stack and its STAR; return the folder."""
    import starfile

    from z3lib.io import open_stack_writer, read_particles
    from z3lib.stages.simulate import simulate_dataset

    folder = SCALE / f"stack_{n_max}"
    star = folder / "particles.star"
    if star.exists():
        return folder
    base = simulate_dataset(
        folder / "base",
        start_model=ROOT / "resources/demo/adk_closed.pdb",
        end_model=ROOT / "resources/demo/adk_open.pdb",
        n_particles=BASE_N,
        box=BOX,
        pixel_size=PIXEL,
        resolution=4.0,
        snr=0.1,
        seed=7,
    )
    images = read_particles(base["particles"]).images()[np.arange(BASE_N)]
    sigma = 0.5 * float(images.std())
    rng = np.random.default_rng(11)
    t0 = time.perf_counter()
    with open_stack_writer(folder / "particles.mrcs", n_max, BOX, PIXEL) as writer:
        for lo in range(0, n_max, BASE_N):
            hi = min(n_max, lo + BASE_N)
            noise = rng.normal(scale=sigma, size=(hi - lo, BOX, BOX)).astype(np.float32)
            writer[lo:hi] = images[: hi - lo] + noise
    print(f"wrote {n_max} particles in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    blocks = starfile.read(base["particles"], always_dict=True)
    rows = blocks["particles"].iloc[np.arange(n_max) % BASE_N].reset_index(drop=True)
    rows["rlnImageName"] = [f"{i + 1:06d}@particles.mrcs" for i in range(n_max)]
    starfile.write({"optics": blocks["optics"], "particles": rows}, folder / "all.star")
    os.replace(folder / "all.star", star)
    return folder


def subset_star(folder: Path, n: int) -> Path:
    """The STAR of the first ``n`` particles."""
    import starfile

    path = folder / f"particles_{n}.star"
    if not path.exists():
        blocks = starfile.read(folder / "particles.star", always_dict=True)
        starfile.write({"optics": blocks["optics"], "particles": blocks["particles"].iloc[:n]}, path)
    return path


def run_stage(stage: str, folder: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one stage in a child process; return its JSON line with the child's peak RSS.

    Refinement runs as the workflow scatters it: one process per chunk of at most
    ``--refine-chunk`` particles, then the gather in a process of its own; its line gives the
    largest peak of the chunk processes, the gather's peak, and the wall time of all of them.
    """
    if stage != "refine":
        return _child_row(stage, folder, n, args)
    n_chunks = max(1, -(-n // args.refine_chunk))
    ran = min(n_chunks, args.refine_chunks_run or n_chunks)
    chunks = [
        _child_row("refine_chunk", folder, n, args, ["--chunk", str(c), "--n-chunks", str(n_chunks)])
        for c in range(ran)
    ]
    refined = sum(c["particles_refined"] for c in chunks)
    wall = sum(c["wall_s"] for c in chunks)
    row: dict[str, Any] = {
        "stage": "refine",
        "particles": n,
        "chunks": n_chunks,
        "chunks_run": ran,
        "particles_refined": refined,
        "peak_rss_mb": max(c["peak_rss_mb"] for c in chunks),
    }
    if ran == n_chunks:  # the gather needs every chunk
        gather = _child_row("gather", folder, n, args, ["--n-chunks", str(n_chunks)])
        wall += gather["wall_s"]
        row.update(gather_peak_rss_mb=gather["peak_rss_mb"], gather_wall_s=gather["wall_s"])
    row.update(wall_s=round(wall, 1), particles_per_s=round(refined / wall, 1))
    return row


def _child_row(
    stage: str, folder: Path, n: int, args: argparse.Namespace, extra: list[str] | None = None
) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", stage, "--folder", str(folder), "--n", str(n)]
    command += ["--epochs", str(args.epochs), "--refine-steps", str(args.refine_steps)]
    command += ["--zart-iterations", str(args.zart_iterations)] + (extra or [])
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"stage {stage} at n={n} failed")
    row: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return row


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM, MB): its own address space since exec.

    (``ru_maxrss`` of a child would also count the pages it shared with its parent before exec.)
    """
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status, MB."""
    status = Path("/proc/self/status").read_text()
    return round(int(status.split(f"{field}:")[1].split()[0]) / 1024, 1)


def child(stage: str, folder: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One stage on the first ``n`` particles (inside the child process)."""
    import torch

    from z3lib.network import NetworkConfig
    from z3lib.refine import RefineConfig
    from z3lib.zart import ZartConfig

    torch.set_num_threads(os.cpu_count() or 1)
    run = folder / f"run_{n}"
    pre = run / "preprocess"
    zernike = {"L1": 7, "L2": 7, "basis": "orthonormal"}
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if stage == "preprocess":
        from z3lib.stages.preprocess import preprocess

        base = folder / "base"
        preprocess(subset_star(folder, n), base / "reference.mrc", base / "mask.mrc", pre, box=64)
    elif stage == "train":
        import z3lib.training as training
        from z3lib.stages.train import train

        spent = [0.0]
        read = training.ParticleBatchSource.batch

        def timed(self: Any, index: np.ndarray, device: torch.device) -> Any:
            start = time.perf_counter()
            out = read(self, index, device)
            spent[0] += time.perf_counter() - start
            return out

        training.ParticleBatchSource.batch = timed  # type: ignore[method-assign]
        cfg = NetworkConfig(epochs=args.epochs)
        shutil.rmtree(run / "ckpt", ignore_errors=True)  # a measurement: never resume
        paths = train(pre / "particles.star", pre / "points.npz", run / "train", cfg, checkpoint_dir=run / "ckpt")
        from z3lib.io import read_table

        history = read_table(paths["history"])
        epoch_s = float(history["seconds"].sum())
        extra = {"images_per_s": round(float(history["images_per_s"].median()), 1)}
        extra["read_share_of_epoch"] = round(spent[0] / (epoch_s + 1e-9), 4)
    elif stage == "predict":
        from z3lib.stages.predict import predict

        predict(run / "train/model.pt", pre / "particles.star", subset_star(folder, n), run / "predict")
    elif stage == "refine_chunk":
        from z3lib.refine_run import chunk_rows
        from z3lib.stages.refine import refine_chunk

        # the network's principal directions as the landscape (no population refit), few steps
        cfg = RefineConfig(steps=args.refine_steps, grid_points=9, population_rounds=0)
        (run / f"refine/chunk_{args.chunk}.progress").unlink(missing_ok=True)  # a measurement: never resume
        refine_chunk(
            pre / "particles.star",
            run / "train/points.npz",
            run / "predict/coefficients.npy",
            run / f"refine/chunk_{args.chunk}.npz",
            chunk=args.chunk,
            n_chunks=args.n_chunks,
            zernike=zernike,
            config=cfg,
            progress_path=run / f"refine/chunk_{args.chunk}.progress",
        )
        extra = {"particles_refined": len(chunk_rows(n, args.chunk, args.n_chunks))}
    elif stage == "gather":
        from z3lib.stages.refine import gather_refined

        chunks = [run / f"refine/chunk_{c}.npz" for c in range(args.n_chunks)]
        gather_refined(chunks, subset_star(folder, n), run / "refine", zernike=zernike)
    elif stage == "zart":
        from z3lib.stages.zart import zart

        cfg = ZartConfig(iterations=args.zart_iterations, field_scale=1.0)  # no scale search
        # the refined fields, or the predicted ones where refinement was not gathered (the same cost)
        fields = "refine" if (run / "refine/coefficients.npy").exists() else "predict"
        extra = {"fields": fields}
        zart(
            pre / "particles.star",
            pre / "points.npz",  # the reference's voxels, as the workflow's round 1
            run / f"{fields}/coefficients.npy",
            run / "zart",
            zernike=zernike,
            config=cfg,
            backend="numpy",
        )
    wall = time.perf_counter() - t0
    row = {"stage": stage, "particles": n, "wall_s": round(wall, 1), "particles_per_s": round(n / wall, 1)}
    # at the end: how much of the resident memory is anonymous (arrays) and how much file pages
    ends = {"rss_anon_end_mb": _status_mb("RssAnon"), "rss_file_end_mb": _status_mb("RssFile")}
    return {**row, **extra, "peak_rss_mb": peak_rss_mb(), **ends}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 100000])
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--refine-steps", type=int, default=10)
    parser.add_argument("--zart-iterations", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stack", type=int, default=100000, help="particles in the stack (sizes take its first rows)")
    parser.add_argument("--refine-chunk", type=int, default=10000, help="particles per refinement chunk process")
    parser.add_argument(
        "--refine-chunks-run",
        type=int,
        default=0,
        help="run only the first K chunk processes (their peak memory and rate; no gather); 0 = all",
    )
    parser.add_argument("--child", choices=STAGES + ["refine_chunk", "gather"], help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--n-chunks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.n, args)))
        return
    import z3lib

    if max(args.sizes) > args.stack:
        parser.error(f"--sizes go up to {max(args.sizes)} but the stack holds --stack {args.stack}")
    folder = make_stack(args.stack)
    stack_gb = (folder / "particles.mrcs").stat().st_size / 1e9
    for n in sorted(args.sizes):
        for stage in args.stages:
            row = run_stage(stage, folder, n, args)
            row.update(
                benchmark="scale",
                box=BOX,
                processing_box=64,
                degrees="7,7,orthonormal",
                stack_gb=round(stack_gb * n / args.stack, 2),
                epochs=args.epochs,
                refine_steps=args.refine_steps,
                refine_chunk=args.refine_chunk,
                z3lib=z3lib.__version__,
                zart_iterations=args.zart_iterations,
                device_name=f"{platform.machine()} x{os.cpu_count()} cores",
            )
            emit(row, args.out)


if __name__ == "__main__":
    main()
