"""Classical refinement against ground truth, and a derivative-free per-particle baseline.

On the demo simulation (5,000 AdK particles, box 64, SNR 0.1) with the (3, 2) network's
predictions as the start (trained here unless `bench_zernike3deep.py`'s default setting left
them in the content-keyed cache of benchmarks/work/: same data, settings and code): displacement
RMS error (Å) and |Spearman| after refinement vs after prediction alone, next to the
representation limit; particles/s of the batched refinement; and the same accuracy and time for
the original's approach — scipy Powell over the 3K coefficients, one particle at a time — on 50
particles, compared with ours on the same 50.

Usage: python benchmarks/bench_refine.py [--n-refine 5000] [--n-powell 50] [--device cpu] [--out f.jsonl]
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    demo_dataset,
    displacement_metrics,
    emit,
    landscape_metrics,
    network_run,
    peak_memory_mb,
)
from scipy.optimize import minimize

from z3lib import zernike as zk
from z3lib.conventions import euler_to_matrix
from z3lib.decoder import circle_mask, image_loss
from z3lib.io import read_coefficients, read_npz, read_particles, read_table
from z3lib.network import NetworkConfig
from z3lib.refine import RefineConfig, make_decoder
from z3lib.refine_run import refine_particles
from z3lib.training import ParticleBatch, ParticleBatchSource

#: The network run whose predictions start the refinement (bench_zernike3deep's default setting).
PREDICTION_CONFIG = NetworkConfig(
    L1=3, L2=2, basis="xmipp", epochs=20, batch_size=32, learning_rate=2e-3, energy_weight=1e-3, smooth_weight=1e-2
)


def network_prediction(data: dict[str, Path], device: str) -> np.ndarray:
    """``(n, 3K)`` the predictions (px of the original box) of :data:`PREDICTION_CONFIG` on
    ``data``, from the content-keyed cache of :func:`common.network_run` (trained when absent)."""
    return read_coefficients(network_run(data, PREDICTION_CONFIG, device)["coefficients"])


def powell_baseline(
    decoder, source: ParticleBatchSource, prior: np.ndarray, index: np.ndarray, prior_weight: float
) -> tuple[np.ndarray, float]:
    """scipy Powell on the 3K coefficients, one particle at a time (the original's search)."""
    mask = circle_mask(decoder.box, 0.9)
    out = np.empty((len(index), prior.shape[1]))
    t0 = time.perf_counter()
    for j, i in enumerate(index):
        b = source.batch(np.array([i]), torch.device("cpu"))
        rot = euler_to_matrix(b.angles[:, 0], b.angles[:, 1], b.angles[:, 2])
        p0 = torch.as_tensor(prior[i][None], dtype=torch.float32)

        def cost(x: np.ndarray, rot: torch.Tensor = rot, b: ParticleBatch = b, p0: torch.Tensor = p0) -> float:
            c = torch.as_tensor(x[None], dtype=torch.float32)
            with torch.no_grad():
                pred = decoder(c, rot, b.shifts, b.ctf)
                img = image_loss(pred, b.images, mask, "corr")
                return float(img + prior_weight * decoder.field_energy(c - p0))

        res = minimize(cost, prior[i], method="Powell", options={"xtol": 1e-3, "ftol": 1e-6, "maxfev": 20000})
        out[j] = res.x
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-refine", type=int, default=5000)
    parser.add_argument("--n-powell", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = demo_dataset()
    t = read_table(data["sim_ground_truth"])["t"].to_numpy()
    prior_orig = network_prediction(data, args.device)
    cloud = read_npz(data["pre_points"])
    box, orig = int(cloud["box"]), int(cloud["original_box"])
    prior = prior_orig * box / orig
    parts = read_particles(data["pre_particles"])
    source = ParticleBatchSource.from_particles(parts)
    decoder = make_decoder(
        cloud["points"],
        cloud["amplitudes"],
        zk.ZernikeSpec(3, 2, "xmipp", box),
        float(cloud["pixel_size"]),
        args.device,
    )
    cfg = RefineConfig()
    idx = np.arange(min(args.n_refine, len(parts)))
    t0 = time.perf_counter()
    res = refine_particles(decoder, source, prior, cfg, index=idx, device=args.device)
    t_ref = time.perf_counter() - t0
    ours = res.coefficients * orig / box
    cpu = f"{platform.machine()} x{torch.get_num_threads()} threads"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu

    def metrics(c: np.ndarray, rows: np.ndarray) -> dict[str, float]:
        m = displacement_metrics(c, t[rows], data["sim_motion"], (3, 2), "xmipp", box)
        m.update(landscape_metrics(c, t[rows]))
        return m

    pred_m, ref_m = metrics(prior_orig[idx], idx), metrics(ours, idx)
    gap = pred_m["displacement_rms_error_A"] - pred_m["representation_limit_A"]
    closed = (pred_m["displacement_rms_error_A"] - ref_m["displacement_rms_error_A"]) / gap
    emit(
        {
            "benchmark": "refine",
            "method": "z3 batched (landscape search + Adam)",
            "particles": len(idx),
            "device": args.device,
            "device_name": device_name,
            "prediction": pred_m,
            "refined": ref_m,
            "gap_closed": round(float(closed), 3),
            "flagged_fraction": round(float(res.flagged.mean()), 4),
            "particles_per_s": round(len(idx) / t_ref, 2),
            "wall_s": round(t_ref, 1),
            "peak_memory_mb": peak_memory_mb(),
        },
        args.out,
    )
    # the derivative-free baseline on the first n_powell particles, ours on the same particles
    if args.n_powell <= 0:
        return
    sub = idx[: args.n_powell]
    powell_c, t_pow = powell_baseline(decoder.cpu(), source, prior, sub, prior_weight=0.01)
    pow_m = metrics(powell_c * orig / box, sub)
    ours_sub = metrics(ours[: len(sub)], sub)
    per_ours = t_ref / len(idx)
    per_pow = t_pow / len(sub)
    emit(
        {
            "benchmark": "refine_baseline",
            "method": "scipy Powell, 3K coefficients, one particle at a time (CPU)",
            "particles": len(sub),
            "powell": pow_m,
            "ours_same_particles": ours_sub,
            "prediction_same_particles": metrics(prior_orig[sub], sub),
            "powell_s_per_particle": round(per_pow, 3),
            "ours_s_per_particle": round(per_ours, 4),
            "speedup": round(per_pow / per_ours, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
