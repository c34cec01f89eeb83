"""Shared helpers of the benchmarks: the demo simulation (cached) and ground-truth metrics."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from z3lib import zernike as zk
from z3lib.preprocess import preprocess
from z3lib.simulate import load_motion, simulate_dataset

WORK = ROOT / "benchmarks" / "work"


def demo_dataset(n: int = 5000, box: int = 64, snr: float = 0.1, seed: int = 0, processing_box: int | None = None,
                 pixel_size: float = 2.0) -> dict[str, Path]:
    """The demo simulation (AdK, 2 Å/px, resolution 5 Å) and its preprocessing, cached in
    ``benchmarks/work/`` (git-ignored) so that benchmarks share it."""
    pbox = processing_box or box
    tag = f"sim_n{n}_b{box}_snr{snr}_s{seed}_px{pixel_size}"
    sim_dir, pre_dir = WORK / tag, WORK / f"{tag}_pre{pbox}"
    if not (sim_dir / "motion.npz").exists():
        simulate_dataset(sim_dir, start_model=ROOT / "resources/demo/adk_closed.pdb",
                         end_model=ROOT / "resources/demo/adk_open.pdb", n_particles=n, box=box,
                         pixel_size=pixel_size, resolution=5.0, snr=snr, seed=seed)
    if not (pre_dir / "points.npz").exists():
        preprocess(sim_dir / "particles.star", sim_dir / "reference.mrc", sim_dir / "mask.mrc", pre_dir, box=pbox)
    names = ("particles.star", "ground_truth.tsv", "motion.npz", "reference.mrc", "mask.mrc", "truth_reference.mrc",
             "state_start.mrc", "state_end.mrc")
    out = {f"sim_{p.split('.')[0]}": sim_dir / p for p in names}
    out.update({f"pre_{p.split('.')[0]}": pre_dir / p for p in ("particles.star", "points.npz", "reference.mrc", "mask.mrc")})
    return out


def displacement_metrics(coefficients: np.ndarray, t: np.ndarray, motion_path: Path, degrees: tuple[int, int],
                         basis: str, box: int) -> dict[str, float]:
    """RMS error (Å) of predicted vs true atom displacements, next to the zero field and the
    representation limit (the least-squares fit of the true displacements in the same basis).

    ``coefficients`` are ``(n, 3K)`` px of ``box`` (Rmax = box / 2), as written by predict.
    """
    motion, scalars = load_motion(motion_path)
    apix = scalars["pixel_size"] * scalars["box"] / box
    keep = motion.weights > 0
    atoms = motion.at(scalars["reference_t"])[keep] / apix  # px of `box`, reference frame
    delta = ((motion.end - motion.start)[keep]) / apix  # true displacement per unit t (px)
    z = zk.evaluate_basis(atoms, *degrees, box / 2, basis)
    dt = t - scalars["reference_t"]
    pred = np.einsum("nk,bak->bna", z, coefficients.reshape(len(t), 3, -1))
    true = dt[:, None, None] * delta[None]
    err = float(np.sqrt(((pred - true) ** 2).sum(-1).mean()) * apix)
    zero = float(np.sqrt((true**2).sum(-1).mean()) * apix)
    fit = zk.deformation_field(z, zk.fit_coefficients(atoms, delta, *degrees, box / 2, basis))
    limit = float(np.sqrt((dt**2).mean() * ((fit - delta) ** 2).sum(-1).mean()) * apix)
    return {"displacement_rms_error_A": round(err, 4), "zero_field_rms_A": round(zero, 4),
            "representation_limit_A": round(limit, 4), "error_over_limit": round(err / limit, 3)}


def landscape_metrics(coefficients: np.ndarray, t: np.ndarray, k: int = 10) -> dict[str, float]:
    """|Spearman| between PC1 of the coefficients and t, and leave-one-out k-NN R² of t."""
    from scipy.spatial import cKDTree
    from scipy.stats import spearmanr

    c = coefficients - coefficients.mean(0)
    pc1 = c @ np.linalg.svd(c, full_matrices=False)[2][0]
    k = min(k, len(c) - 1)
    _, idx = cKDTree(c).query(c, k=k + 1)
    t_hat = t[idx[:, 1:]].mean(1)
    r2 = 1 - ((t - t_hat) ** 2).sum() / ((t - t.mean()) ** 2).sum()
    return {"spearman_pc1_t": round(abs(float(spearmanr(pc1, t).correlation)), 4), "knn_r2_t": round(float(r2), 4)}


def peak_memory_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def emit(row: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as fh:
            fh.write(line + "\n")

