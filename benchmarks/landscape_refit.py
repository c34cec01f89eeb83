"""How good is the population landscape itself? Refit it on a finished yardstick run, judge it by the truth.

The yardstick (``yardstick.py``) measures the whole pipeline; this isolates the population fit
(rule ``refine_landscape``). It takes a finished run's network, learned reference and predictions,
refits the landscape with the given ``refine`` settings (``z3lib.stages.refine.refine_landscape``,
as the workflow calls it), and measures against the simulation's truth:

* ``fit_rms_A``: RMS error (Å, heavy atoms, all particles) of the fitted coefficients'
  fields at the reference state's atoms against the true displacements (the number the yardstick
  reports after the chunks, which move it little);
* ``fit_frame_free_rms_A``: the same less its mean over the particles (the part no change of
  reference frame removes; the consensus map is a blur of the ensemble, not the truth's state);
* ``span_best_rms_A``: the same with every state given its best coefficients inside the fitted
  landscape (mean + span of its directions, least squares against the truth): what the landscape
  could reach with perfect scores, so the error of the directions alone;
* ``mean_only_rms_A``: the landscape's mean field for every particle;
* ``truth_pc_in_span``: for the truth's first principal directions (of the true displacements at
  the atoms, over the particles), the norm of their projection onto the fitted span (1 = inside);
* ``truth_k_direction_rms_A``: the best any k-direction linear landscape can do on this motion
  (principal components of the true displacements), k = 1…3.

Usage::

    python benchmarks/landscape_refit.py RUN_RESULTS DATA [--set refine.min_dimensions=2 ...] [--out F]

The settings are the library's ``RefineConfig`` defaults with the ``--set`` changes (not the
run's own ``refine`` settings); the row records all of them.

``RUN_RESULTS`` is ``benchmarks/work/yardstick/runs/<run>/results/<name>``, ``DATA`` its dataset
folder (``benchmarks/work/yardstick/data/<dataset>``). With the same network the refit is
deterministic, so settings compare exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import emit
from yardstick import field_errors

from z3lib import zernike as zk


def _truth_fields(
    truth: dict[str, np.ndarray], zernike: dict[str, Any], box: int, pixel_size: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The basis at the reference atoms ``(N, K)``, true displacements ``(S, N, 3)`` px, state weights ``(S,)``."""
    coords, ref, state = truth["coords"], int(truth["reference"]), truth["state"]
    z = zk.evaluate_basis(coords[ref] / pixel_size, zernike["L1"], zernike["L2"], box / 2, zernike["basis"])
    weights = np.bincount(state, minlength=len(coords)).astype(np.float64)
    return z, (coords - coords[ref]) / pixel_size, weights


def landscape_errors(
    landscape: dict[str, np.ndarray], data: Path, zernike: dict[str, Any], box: int, pixel_size: float
) -> dict[str, Any]:
    """The figures of the module docstring for one fitted landscape (``refine_landscape``'s ``.npz``)."""
    truth = dict(np.load(data / "truth" / "truth.npz"))
    z, true, weights = _truth_fields(truth, zernike, box, pixel_size)
    n_atoms, k_terms = z.shape

    def field(c: np.ndarray) -> np.ndarray:
        return np.asarray(z @ c.reshape(3, k_terms).T)

    mean, dirs = landscape["landscape_mean"], landscape["landscape_directions"]
    span = np.stack([field(u).ravel() for u in dirs], axis=1)  # (3N, k)
    best, only = np.zeros(len(true)), np.zeros(len(true))
    for s in range(len(true)):
        r = (true[s] - field(mean)).ravel()
        x, *_ = np.linalg.lstsq(span, r, rcond=None)
        best[s], only[s] = ((r - span @ x) ** 2).sum(), (r**2).sum()
    total = weights.sum() * n_atoms

    def rms(per_state: np.ndarray) -> float:
        return round(float(np.sqrt((weights * per_state).sum() / total) * pixel_size), 4)

    fit = field_errors(
        landscape["coefficients"], truth, (zernike["L1"], zernike["L2"]), zernike["basis"], box, pixel_size
    )
    centred = (true - (weights[:, None, None] * true).sum(0) / weights.sum()).reshape(len(true), -1)
    _, sv, vt = np.linalg.svd(centred * np.sqrt(weights)[:, None], full_matrices=False)
    q, _ = np.linalg.qr(span)
    power = sv**2
    return {
        "directions": len(dirs),
        "fit_rms_A": fit["rms_A"],
        "fit_frame_free_rms_A": fit["frame_free_rms_A"],
        "span_best_rms_A": rms(best),
        "mean_only_rms_A": rms(only),
        "truth_pc_in_span": [round(float(np.linalg.norm(q.T @ vt[j])), 3) for j in range(min(3, len(vt)))],
        "truth_pc_variance": [round(float(p / power.sum()), 4) for p in power[:3]],
        "truth_k_direction_rms_A": {
            str(k): round(float(np.sqrt(power[k:].sum() / total) * pixel_size), 4) for k in (1, 2, 3)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a yardstick run's results/<name> folder")
    parser.add_argument("data", type=Path, help="its dataset folder")
    parser.add_argument("--set", action="append", default=[], help="refine.KEY=VALUE (YAML value)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import yaml

    import z3lib
    from z3lib.refine import RefineConfig
    from z3lib.stages.refine import refine_landscape

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    run = yaml.safe_load((args.results.parents[1] / "yardstick.yaml").read_text())
    changed = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if not key.startswith("refine."):
            parser.error(f"--set {item}: only refine.* settings are refitted")
        changed[key.removeprefix("refine.")] = yaml.safe_load(value)
    config = RefineConfig(**changed)  # the library's defaults with these changes, not the run's
    params = json.loads((args.data / "params.json").read_text())
    box, pixel_size = int(run["box"]), float(params["pixel_size"])
    res, rnd = args.results, args.results / "rounds" / "1"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "landscape.npz"
        refine_landscape(
            res / "preprocess/particles.star",
            [rnd / "train/points.npz"],
            rnd / "predict/coefficients.npy",
            [out],
            zernike=run["zernike"],
            config=config,
            poses=rnd / "predict/particles.star",
            roughness=run.get("train", {}).get("roughness", "strain"),
            log=logging.getLogger("refit"),
        )
        wall = time.perf_counter() - t0
        fitted = dict(np.load(out))
    row = {
        "benchmark": "landscape_refit",
        "run": str(res),
        "dataset": args.data.name,
        "settings": changed,
        "refine": config.to_dict(),
        **landscape_errors(fitted, args.data, run["zernike"], box, pixel_size),
        "wall_s": round(wall, 1),
        "z3lib": z3lib.__version__,
        "device_name": f"{platform.machine()} x{os.cpu_count()} cores",
    }
    emit(row, args.out)


if __name__ == "__main__":
    main()
