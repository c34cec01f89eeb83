"""ZART against the true reference-conformation map, and back-end speed.

On the demo simulation (5,000 AdK particles, box 64, SNR 0.1): gold-standard reconstructions with
the refined fields (corrected), the network's predicted fields, zero fields (uncorrected) and the
true fields (oracle: the least-squares fit of the true atom displacements in the same basis),
each compared with the true map at t = 0.5: FSC area (mean FSC up to Nyquist) and resolution at
FSC 0.5 and 0.143, plus the half-map FSC resolution. Then images/s of each back end at box 64 and
128 on a synthetic point cloud.

Usage: python benchmarks/bench_zart.py [--iterations 4] [--backend numpy|cupy] [--skip-quality]
       [--speed-backends numpy cupy] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_refine import network_prediction
from common import cached_array, demo_dataset, emit

from z3lib import zernike as zk
from z3lib.analysis import fourier_shell_correlation, fsc_area, resolution_at
from z3lib.devices import cupy_device_name, cupy_usable
from z3lib.geometry import matrix_to_euler, points_from_mask, random_rotations, sphere_mask
from z3lib.io import read_map, read_npz, read_particles, read_table
from z3lib.refine import RefineConfig, make_decoder
from z3lib.refine_run import refine_particles
from z3lib.simulate import load_motion
from z3lib.training import ParticleBatchSource, array_digest
from z3lib.zart import (
    ZartConfig,
    get_backend,
    half_sets,
    reconstruct_zart,
    soft_support,
    values_to_volume,
)


def refined_fields(data: dict[str, Path], prior_orig: np.ndarray, device: str = "cpu") -> np.ndarray:
    """``(n, 3K)`` refined coefficients (px of the original box) from the predictions
    ``prior_orig``, cached by content: the data's key, the predictions' digest, the refinement
    settings, degrees, basis, device and the code (z3lib.refine and what it imports, this file)."""
    config = RefineConfig()
    params = {
        "data": data["key"].parent.name,
        "prior": array_digest(prior_orig),
        "config": config.to_dict(),
        "degrees": [3, 2],
        "basis": "xmipp",
        "device": device,
    }

    def make() -> np.ndarray:
        cloud = read_npz(data["pre_points"])
        box, orig = int(cloud["box"]), int(cloud["original_box"])
        dec = make_decoder(
            cloud["points"], cloud["amplitudes"], zk.ZernikeSpec(3, 2, "xmipp", box), float(cloud["pixel_size"]), device
        )
        src = ParticleBatchSource.from_particles(read_particles(data["pre_particles"]))
        res = refine_particles(dec, src, prior_orig * box / orig, config, device=device)
        out: np.ndarray = res.coefficients * orig / box
        return out

    return cached_array("refined", params, ["z3lib.refine"], [Path(__file__)], make)


def oracle_fields(data: dict[str, Path], t: np.ndarray, box: int) -> np.ndarray:
    motion, sc = load_motion(data["sim_motion"])
    apix = sc["pixel_size"] * sc["box"] / box
    keep = motion.weights > 0
    atoms = motion.at(sc["reference_t"])[keep] / apix
    delta = (motion.end - motion.start)[keep] / apix
    c = zk.fit_coefficients(atoms, delta, 3, 2, box / 2, "xmipp")
    return np.outer(t - sc["reference_t"], c)


def speed(backend_name: str, box: int, n_images: int = 256) -> float:
    """Images/s of one back end: one iteration over ``n_images`` synthetic images, batch 64,
    after a warm-up batch (kernel compilation, FFT plans)."""
    rng = np.random.default_rng(0)
    pts, _ = points_from_mask(sphere_mask(box, 0.3 * box))
    rots = random_rotations(n_images, rng)
    rot, tilt, psi = matrix_to_euler(rots)
    table = pd.DataFrame(
        {
            "rot": rot,
            "tilt": tilt,
            "psi": psi,
            "shift_x": 0.0,
            "shift_y": 0.0,
            "defocus_u": 15000.0,
            "defocus_v": 14000.0,
            "defocus_angle": 0.0,
            "voltage": 300.0,
            "cs": 2.7,
            "amplitude_contrast": 0.1,
        }
    )
    imgs = rng.normal(size=(n_images, box, box)).astype(np.float32)
    basis = zk.evaluate_basis(pts, 3, 2, box / 2).astype(np.float32)
    coeffs = rng.normal(scale=0.3, size=(n_images, 39))
    be = get_backend(backend_name)
    cfg = ZartConfig(iterations=1, batch_size=64)
    warm = 64 if backend_name == "cupy" else 4  # kernel compilation and FFT plans; numpy needs none
    reconstruct_zart(be, pts, basis, coeffs, imgs, table, np.arange(warm), box, 2.0, cfg)
    _, stats = reconstruct_zart(be, pts, basis, coeffs, imgs, table, np.arange(n_images), box, 2.0, cfg)
    return float(stats["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument(
        "--backend", default="numpy", choices=["numpy", "cupy"], help="back end of the quality reconstructions"
    )
    parser.add_argument("--skip-quality", action="store_true", help="only the speed rows")
    parser.add_argument(
        "--speed-backends", nargs="*", default=None, help="back ends timed (default: numpy, and cupy when usable)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.skip_quality:
        quality(args)
    backends = (
        args.speed_backends if args.speed_backends is not None else ["numpy"] + (["cupy"] if cupy_usable() else [])
    )
    for backend in backends:
        device = (
            cupy_device_name()
            if backend == "cupy"
            else f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
        )
        for b in (64, 128):
            # enough images that the GPU's rate is not dominated by the start of the run
            n = 4096 if backend == "cupy" else (256 if b == 64 else 128)
            emit(
                {
                    "benchmark": "zart_speed",
                    "backend": backend,
                    "device_name": device,
                    "box": b,
                    "points": len(points_from_mask(sphere_mask(b, 0.3 * b))[0]),
                    "batch_size": 64,
                    "images": n,
                    "images_per_s": round(speed(backend, b, n), 1),
                },
                args.out,
            )


def quality(args: argparse.Namespace) -> None:
    data = demo_dataset()
    t = read_table(data["sim_ground_truth"])["t"].to_numpy()
    parts = read_particles(data["pre_particles"])
    cloud = read_npz(data["pre_points"])
    box, orig, apix = int(cloud["box"]), int(cloud["original_box"]), float(cloud["pixel_size"])
    pts = np.asarray(cloud["points"], dtype=np.float64)
    basis = zk.evaluate_basis(pts, 3, 2, box / 2).astype(np.float32)
    truth = read_map(data["sim_truth_reference"]).data
    predicted = network_prediction(data, "cpu")
    fields = {
        "corrected (refined fields)": refined_fields(data, predicted) * box / orig,
        "corrected (predicted fields)": predicted * box / orig,
        "uncorrected (zero fields)": None,
        "oracle (true fields)": oracle_fields(data, t, box),
    }
    h1, h2 = half_sets(parts.table["random_subset"].to_numpy(), 0)
    cfg = ZartConfig(iterations=args.iterations)
    stack = parts.images()
    mask = soft_support(pts, box)
    backend = get_backend(args.backend)
    rows = {}
    for name, coeffs in fields.items():
        t0 = time.perf_counter()
        halves = []
        for rows_h in (h1, h2):
            vals, _ = reconstruct_zart(
                backend, pts, basis if coeffs is not None else None, coeffs, stack, parts.table, rows_h, box, apix, cfg
            )
            halves.append(values_to_volume(vals, pts, box))
        full = 0.5 * (halves[0] + halves[1])
        vs_truth = fourier_shell_correlation(full, truth, apix)
        half = fourier_shell_correlation(halves[0] * mask, halves[1] * mask, apix)
        rows[name] = {
            "fsc_area_vs_truth": round(fsc_area(vs_truth), 4),
            "resolution_fsc0.5_vs_truth_A": round(resolution_at(vs_truth, 0.5), 3),
            "resolution_fsc0.143_vs_truth_A": round(resolution_at(vs_truth, 0.143), 3),
            "half_map_resolution_fsc0.143_A": round(resolution_at(half, 0.143), 3),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    gap = rows["oracle (true fields)"]["fsc_area_vs_truth"] - rows["uncorrected (zero fields)"]["fsc_area_vs_truth"]
    closed = {
        name: round((r["fsc_area_vs_truth"] - rows["uncorrected (zero fields)"]["fsc_area_vs_truth"]) / gap, 3)
        for name, r in rows.items()
        if name.startswith("corrected")
    }
    digest = hashlib.md5(Path(data["sim_ground_truth"]).read_bytes()).hexdigest()  # same simulation everywhere
    emit(
        {
            "benchmark": "zart_quality",
            "particles": len(parts),
            "ground_truth_md5": digest,
            "box": box,
            "iterations": args.iterations,
            "backend": args.backend,
            "device_name": cupy_device_name() if args.backend == "cupy" else "CPU",
            "reconstructions": rows,
            "fsc_area_gap_closed": closed,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
