"""The best landscape and fields any method could estimate from the yardstick's images.

For each particle of a yardstick dataset (``yardstick_sim``), every state of the true motion is
imaged through that particle's known pose, shift and CTF (z3's Gaussian-atom renderer), and the
particle's posterior over the states is computed from its noisy image: the likelihood of white
Gaussian noise with an unknown scale, offset and level, profiled (``−log L = (M/2) log(1 − ρ²)``,
ρ the correlation inside the inscribed disc of M pixels), under a uniform prior over the states
(the simulation's own prior). The posterior mean of the coordinate and of the displacement at
every atom are the least-squares estimates with the *exact* motion model: the ceiling of the
landscape figures and the floor of the displacement error for any method that does not know the
motion beforehand. The ASPIRE images are rendered by another projector than these templates
(their clean images correlate ≈ 0.99 with z3's; ``dataset_checks`` of the yardstick), so on that
source the bound is very slightly pessimistic.

Usage::

    python benchmarks/oracle_landscape.py [--jobs hinge:aspire:2000 ...] [--out PATH]

Rows go to ``benchmarks/results/oracle_landscape.jsonl``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, emit, landscape_metrics
from yardstick import YARD, beam_split_rms, field_errors
from yardstick_sim import RESOLUTION, SimParams, load_atoms, simulate

RESULTS = ROOT / "benchmarks" / "results" / "oracle_landscape.jsonl"
log = logging.getLogger("oracle_landscape")


def state_log_likelihoods(
    images: np.ndarray, coords: np.ndarray, weights: np.ndarray, meta: dict[str, np.ndarray], params: SimParams
) -> np.ndarray:
    """``(n, S)`` profiled log-likelihood of every image under every state's template.

    ``images`` ``(n, box, box)``; ``coords`` ``(S, N, 3)`` Å; ``meta`` RELION columns of the
    particles (angles in degrees, origins in Å, CTF).
    """
    import torch

    from z3lib.conventions import euler_to_matrix
    from z3lib.ctf import CtfParams, apply_ctf
    from z3lib.decoder import circle_mask
    from z3lib.simulate import gaussian_sigma, project_atoms

    apix, box = params.pixel_size, params.box
    n, n_states = len(images), len(coords)
    rot = torch.tensor(euler_to_matrix(meta["rot"], meta["tilt"], meta["psi"]), dtype=torch.float32)
    shifts = torch.tensor(np.stack([meta["shift_x"], meta["shift_y"]], 1), dtype=torch.float32)
    xyz = torch.tensor(coords / apix, dtype=torch.float32)
    w = torch.tensor(weights, dtype=torch.float32)
    mask = circle_mask(box, 1.0) > 0.5
    m = int(mask.sum())
    sigma = gaussian_sigma(RESOLUTION) / apix
    out = np.empty((n, n_states))
    t0 = time.perf_counter()
    for i in range(n):
        proj = project_atoms(xyz, w, rot[i].expand(n_states, 3, 3), shifts[i].expand(n_states, 2), box, sigma)
        ctf = CtfParams.create(
            np.full(n_states, meta["defocus_u"][i]),
            np.full(n_states, meta["defocus_v"][i]),
            np.full(n_states, meta["defocus_angle"][i]),
            params.voltage,
            params.cs,
            params.amplitude_contrast,
        )
        tpl = apply_ctf(proj, apix, ctf, pad=2)[:, mask].double()
        tpl = tpl - tpl.mean(1, keepdim=True)
        y = torch.as_tensor(images[i][mask.numpy()], dtype=torch.float64)
        y = y - y.mean()
        rho = (tpl @ y) / (tpl.norm(dim=1) * y.norm() + 1e-30)
        out[i] = (-0.5 * m * torch.log1p(-(rho**2).clamp(max=1 - 1e-12))).numpy()
        if (i + 1) % 200 == 0:
            rate = (i + 1) / (time.perf_counter() - t0)
            log.info("%d / %d particles, %.1f/s, ETA %.0f s", i + 1, n, rate, (n - i - 1) / rate)
    return out


def posterior(loglik: np.ndarray) -> np.ndarray:
    """``(n, S)`` posterior over the states under a uniform prior."""
    z = loglik - loglik.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def measure(job: str) -> dict[str, Any]:
    """Simulate (cached, as the yardstick does) and measure the exact-model posterior estimates."""
    from z3lib.io import read_particles
    from z3lib.simulate import atom_weights

    scenario, source, n = job.split(":")
    params = SimParams(scenario=scenario, source=source, n=int(n))
    data = YARD / "data" / f"{scenario}_{source}_n{n}_{params.key()}"
    simulate(params, data, log=log.info)
    truth = dict(np.load(data / "truth" / "truth.npz"))
    parts = read_particles(data / "particles.star")
    table = parts.table
    stack = parts.images()
    images = np.asarray(stack[np.arange(len(table))], dtype=np.float32)
    meta = {k: table[k].to_numpy() for k in ("rot", "tilt", "psi", "shift_x", "shift_y")}
    meta.update({k: table[k].to_numpy() for k in ("defocus_u", "defocus_v", "defocus_angle")})
    weights = atom_weights(load_atoms().elements)
    t0 = time.perf_counter()
    loglik = state_log_likelihoods(images, truth["coords"], weights, meta, params)
    wall = time.perf_counter() - t0
    post = posterior(loglik)
    coordinate = truth["coordinate"]  # (S, D)
    estimate = post @ coordinate  # (n, D) posterior mean
    true_coord = coordinate[truth["state"]]
    names = [str(x) for x in truth["names"]]
    row: dict[str, Any] = {
        "benchmark": "oracle_landscape",
        "scenario": scenario,
        "source": source,
        "particles": int(n),
        "box": params.box,
        "pixel_size_A": params.pixel_size,
        "snr": params.snr,
        "dataset": data.name,
        "what": "posterior means under the exact motion model and the true poses/CTFs (uniform prior)",
    }
    for j, name in enumerate(names):
        m = landscape_metrics(estimate, true_coord[:, j])
        row[f"spearman_{name}"] = _spearman(estimate[:, j], true_coord[:, j])
        row[f"knn_r2_{name}"] = m["knn_r2_t"]
        row[f"map_accuracy_{name}"] = round(float(np.mean(coordinate[post.argmax(1), j] == true_coord[:, j])), 4)
    # the posterior-mean displacement at the reference atoms: the least-squares field
    row["displacement_posterior_mean"] = _posterior_displacement_error(post, truth)
    row["displacement_zero_field"] = field_errors(None, truth, (1, 1), "xmipp", params.box, params.pixel_size)
    row["wall_s"] = round(wall, 1)
    row["host"] = platform.node()
    row["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    stack.close()
    return row


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return round(abs(float(spearmanr(a, b).correlation)), 4)


def _posterior_displacement_error(post: np.ndarray, truth: dict[str, np.ndarray]) -> dict[str, float]:
    """RMS (Å) over heavy atoms and particles of the posterior-mean displacement − the truth,
    total, in-plane and along the beam (the yardstick's split)."""
    coords, ref, state = truth["coords"], int(truth["reference"]), truth["state"]
    disp = (coords - coords[ref]).reshape(len(coords), -1)  # (S, 3N) Å

    def error(sl: slice) -> np.ndarray:
        return np.asarray(post[sl] @ disp - disp[state[sl]]).reshape(len(state[sl]), -1, 3)

    return beam_split_rms(error, truth, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=["hinge:aspire:2000"], help="scenario:source:n")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    scratch = YARD / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    here = Path.cwd()
    os.chdir(scratch)  # importing aspire writes logs/ into the working directory
    import aspire  # noqa: F401

    os.chdir(here)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    log.disabled = False  # importing aspire disables the loggers that exist
    for job in args.jobs:
        emit(measure(job), args.out)


if __name__ == "__main__":
    main()
