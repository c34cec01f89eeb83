"""Where does the population landscape lose? Its steps fed with the truth, on a finished yardstick run.

``landscape_refit.py`` judges the population fit as a whole; this feeds its two steps
(``z3lib.population``: the direction refit at fixed scores, and the scoring along fixed
directions) with the truth, one at a time, on a finished run's particles and network reference:

* the **truth landscape**: the true displacements spread smoothly over the run's points and
  fitted per state in the run's basis (``yardstick.smooth_true_fits``, the yardstick's "true
  fields"); its mean and first ``k`` principal directions,
  with every particle's true scores on them (``truth_landscape``: its error, the floor of this
  experiment);
* ``objective``: the population fit's objective (mean image loss + smoothness) of the truth
  landscape at the true scores, against the run's own fitted landscape; if the run's is lower,
  the objective's optimum is not the truth;
* ``refit_from_truth``: the direction refit started at the truth landscape with the true scores
  held fixed; where it moves the landscape, the objective pulls away from the truth;
* ``score_truth``: every particle scored along the truth's directions (coordinate-wise, as the
  pipeline does, two sweeps from the true scores shuffled over the particles, so that no
  particle starts at its own), and, for two directions, on a joint 15 × 15 grid over 1.2 × the
  true scores' range (posterior mean under the EM prior over the grid): the error the scoring
  alone leaves.

``--reference sharp`` replaces the run's reference amplitudes by the truth's reference-state map
at the same points (the consensus the pipeline uses is a blur of the ensemble): what a perfect
reference would change.

Each figure is the fields' RMS error at the atoms (``field_errors`` of ``yardstick.py``: total and
frame-free) and, for landscapes, the span error (``landscape_refit.landscape_errors``).

Usage::

    python benchmarks/landscape_diagnosis.py RUN_RESULTS DATA [--reference consensus|sharp] [--out F]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import emit
from landscape_refit import landscape_errors
from yardstick import field_errors, smooth_true_fits

from z3lib.population import (
    _mean_losses,
    _orthonormal_fit,
    fit_directions,
    score_particles,
    score_particles_joint,
)

log = logging.getLogger("landscape_diagnosis")
CPU = torch.device("cpu")


def truth_landscape(
    points: np.ndarray, truth: dict[str, np.ndarray], zernike: dict[str, Any], box: int, apix: float, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean ``(3K,)``, directions ``(k, 3K)`` (scaled to unit-variance scores) and scores ``(n, k)``."""
    fits = smooth_true_fits(points, truth, (zernike["L1"], zernike["L2"]), zernike["basis"], box, apix)
    per_particle = fits[truth["state"]]
    mean = per_particle.mean(0)
    _, _, vt = np.linalg.svd(per_particle - mean, full_matrices=False)
    scores = (per_particle - mean) @ vt[:k].T
    scale = scores.std(0)
    return mean, vt[:k] * scale[:, None], scores / scale


def joint_scores(
    decoder: Any, source: Any, mean: np.ndarray, dirs: np.ndarray, start: np.ndarray, config: Any
) -> np.ndarray:
    """Posterior-mean scores ``(n, 2)`` on a joint 15 × 15 grid over 1.2 × the range of ``start``."""
    axes = [np.linspace(1.2 * start[:, j].min(), 1.2 * start[:, j].max(), 15) for j in range(2)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    m, d = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(dirs, dtype=torch.float32)
    z, _ = score_particles_joint(decoder, source, m, d, start, [0, 1], grid, config, device=CPU, log=log)
    return z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a yardstick run's results/<name> folder")
    parser.add_argument("data", type=Path, help="its dataset folder")
    parser.add_argument("--reference", choices=("consensus", "sharp"), default="consensus")
    parser.add_argument("--directions", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import mrcfile
    import yaml

    import z3lib
    from z3lib.conventions import box_center
    from z3lib.refine import RefineConfig
    from z3lib.stages.refine import _cloud_decoder, _refine_inputs
    from z3lib.training import ParticleBatchSource

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    run = yaml.safe_load((args.results.parents[1] / "yardstick.yaml").read_text())
    zern, config = run["zernike"], RefineConfig()
    rnd = args.results / "rounds" / "1"
    parts, clouds, _, spec = _refine_inputs(
        args.results / "preprocess/particles.star",
        [rnd / "train/points.npz"],
        rnd / "predict/coefficients.npy",
        zern,
        independent_halves=False,
        poses=rnd / "predict/particles.star",
        pixel_size=None,
        image_root=None,
        log=log,
    )
    cloud = dict(clouds[0])
    box, apix = int(cloud["box"]), float(cloud["pixel_size"])
    if args.reference == "sharp":
        vol = mrcfile.read(args.data / "truth" / "reference_state.mrc").astype(np.float32)
        idx = np.round(np.asarray(cloud["points"])[:, ::-1] + box_center(box)).astype(int)
        amp = vol[idx[:, 0], idx[:, 1], idx[:, 2]]
        cloud["amplitudes"] = (amp * (np.asarray(cloud["amplitudes"]).sum() / amp.sum())).astype(np.float32)
    source = ParticleBatchSource.from_particles(parts)
    decoder = _cloud_decoder(cloud, spec, CPU, run.get("train", {}).get("roughness", "strain"))
    truth = dict(np.load(args.data / "truth" / "truth.npz"))
    mean, dirs, scores = truth_landscape(
        np.asarray(cloud["points"], np.float64), truth, zern, box, apix, args.directions
    )

    def judge(m: np.ndarray, d: np.ndarray, z: np.ndarray) -> dict[str, float]:
        fit = _orthonormal_fit(np.asarray(m, np.float64), np.asarray(d, np.float64), np.asarray(z, np.float64), [])
        err = field_errors(fit.coefficients, truth, (zern["L1"], zern["L2"]), zern["basis"], box, apix)
        span = landscape_errors(fit.to_arrays(), args.data, zern, box, apix)
        return {
            "rms_A": err["rms_A"],
            "frame_free_rms_A": err["frame_free_rms_A"],
            "span_rms_A": span["span_best_rms_A"],
        }

    def objective(m: np.ndarray, d: np.ndarray, z: np.ndarray) -> float:
        image, rough = _mean_losses(
            decoder,
            source,
            torch.as_tensor(m, dtype=torch.float32),
            torch.as_tensor(d, dtype=torch.float32),
            z,
            config,
            device=CPU,
        )
        return round(image + config.population_smooth_weight * rough, 6)

    row: dict[str, Any] = {"benchmark": "landscape_diagnosis", "run": str(args.results), "dataset": args.data.name}
    row.update(reference=args.reference, directions=args.directions, truth_landscape=judge(mean, dirs, scores))
    fitted = np.load(rnd / "refine" / "landscape.npz")
    row["objective"] = {
        "truth_landscape": objective(mean, dirs, scores),
        "run_landscape": objective(fitted["landscape_mean"], fitted["landscape_directions"], fitted["scores"]),
    }
    m, d = torch.as_tensor(mean, dtype=torch.float32).clone(), torch.as_tensor(dirs, dtype=torch.float32).clone()
    fit_directions(decoder, source, m, d, scores, config, device=CPU, log=log)
    row["refit_from_truth"] = judge(m.numpy(), d.numpy(), scores)
    shuffled = scores[np.random.default_rng(0).permutation(len(scores))]
    m, d = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(dirs, dtype=torch.float32)
    z1, _ = score_particles(decoder, source, m, d, shuffled, config, device=CPU, log=log)
    z2, _ = score_particles(decoder, source, m, d, z1, config, device=CPU, log=log)
    row["score_truth"] = {"one_sweep": judge(mean, dirs, z1), "two_sweeps": judge(mean, dirs, z2)}
    if args.directions == 2:
        row["score_truth"]["joint_grid"] = judge(mean, dirs, joint_scores(decoder, source, mean, dirs, scores, config))
    row.update(
        wall_s=round(time.perf_counter() - t0, 1),
        z3lib=z3lib.__version__,
        device_name=f"{platform.machine()} x{os.cpu_count()} cores",
    )
    source.images.close()
    emit(row, args.out)


if __name__ == "__main__":
    main()
