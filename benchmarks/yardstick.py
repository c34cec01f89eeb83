"""The honest yardstick: the real pipeline on images from a simulator not written here.

For each scenario × source × degree: simulate (``yardstick_sim``: gemmi maps, ASPIRE images, or
z3's renderer; non-linear AdK motions; SNR 0.1), reconstruct the consensus reference and its mask
from the noisy particles alone (``z3lib.consensus.consensus_reference``), run the Snakemake
workflow users run (``--workflow-profile profiles/ci``) on the particles, that reference and mask,
then measure against the ground truth, which the pipeline never sees:

* landscape: |Spearman| of PC1 vs each true coordinate, leave-one-out k-NN R² of each coordinate,
  for the predicted and the refined coefficients;
* deformation: RMS error (Å) over heavy atoms of all particles of the field at the reference
  state's atoms vs the true displacement (atoms of the particle's state − reference state), split
  into in-plane and along-the-beam parts (error rotated by the particle's A), next to the zero
  field and the representation limits (per-state least-squares fits) of (3,2) xmipp, (5,3) xmipp
  and (7,7) orthonormal. The reference state is the truth's (the middle of the motion), although
  the pipeline's reference is the consensus map, a blur of the whole ensemble;
* maps: FSC area and FSC-0.5 resolution of each half-map average (uncorrected, corrected, and the
  oracle: the same particles, poses, CTFs, shifts and noise, every particle in the reference
  state, reconstructed by the same ZART code with zero fields on the pipeline's point cloud)
  against the noise-free reference-state map of the same renderer; gap closed =
  (corrected − uncorrected) / (oracle − uncorrected) in FSC area; also the gap that the *true*
  fields of the pipeline's degree close (fitted smoothly over the pipeline's mask points), the
  ceiling of that basis, and the field scale ZART chose;
* speed: wall time of every rule (Snakemake benchmark files) and training images/s (train.log).

Usage::

    python benchmarks/yardstick.py [--jobs hinge:aspire:5000 ...] [--degrees 3,2,xmipp 7,7,orthonormal]
        [--set rounds=2 --set train.epochs=10] [--smoke] [--full] [--out PATH]

A job is ``scenario:source:n`` (scenario hinge | path | two_motions; source aspire | z3). Datasets
and pipeline runs are cached under ``benchmarks/work/yardstick/`` (git-ignored), keyed by a hash
of every simulation parameter and of ``yardstick_sim.py``; runs are keyed by their config.
Results are appended to ``benchmarks/results/yardstick.jsonl`` (one JSON line per job × degree).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from common import ROOT, WORK, emit, landscape_metrics
from yardstick_sim import SimParams, simulate

from z3lib import zernike as zk
from z3lib.analysis import fourier_shell_correlation, fsc_area, resolution_at
from z3lib.conventions import euler_to_matrix

YARD = WORK / "yardstick"
RESULTS = ROOT / "benchmarks" / "results" / "yardstick.jsonl"
LIMIT_DEGREES = ((3, 2, "xmipp"), (5, 3, "xmipp"), (7, 7, "orthonormal"))
log = logging.getLogger("yardstick")


# ----------------------------------------------------------------------------------------------
# Metrics (pure functions)
# ----------------------------------------------------------------------------------------------
def field_errors(
    coefficients: np.ndarray | None,
    truth: dict[str, np.ndarray],
    degrees: tuple[int, int],
    basis: str,
    box: int,
    pixel_size: float,
    residual: np.ndarray | None = None,
    chunk: int = 500,
) -> dict[str, float]:
    """RMS (Å) of field − true displacement over heavy atoms of all particles, total, in-plane and
    along the beam; ``frame_offset_rms_A``, the RMS over the atoms of the error's mean over the
    particles (what a change of reference frame would remove), and ``frame_free_rms_A``, the rest.

    Parameters
    ----------
    coefficients
        ``(n, 3K)`` px of ``box`` (Rmax = box / 2, layout [cx, cy, cz]); None = zero field.
    truth
        ``coords`` ``(S, N, 3)`` Å, ``reference`` (state index), ``state`` ``(n,)``, ``rot``,
        ``tilt``, ``psi`` ``(n,)`` degrees (RELION).
    residual
        instead of coefficients: ``(S, N, 3)`` px error per state (e.g. a representation limit).
    """
    coords, ref, state = truth["coords"], int(truth["reference"]), truth["state"]
    ref_px = coords[ref] / pixel_size
    true_px = (coords - coords[ref]) / pixel_size  # (S, N, 3)
    z = zk.evaluate_basis(ref_px, *degrees, box / 2, basis) if coefficients is not None else None

    total = np.zeros(true_px.shape[1:])

    def error(sl: slice) -> np.ndarray:
        if residual is not None:
            out = residual[state[sl]]
        elif coefficients is not None and z is not None:
            pred = np.einsum("nk,bak->bna", z, coefficients[sl].reshape(len(state[sl]), 3, -1))
            out = pred - true_px[state[sl]]
        else:
            out = -true_px[state[sl]]
        total[:] += out.sum(axis=0)
        return np.asarray(out)

    row = beam_split_rms(error, truth, pixel_size, chunk)
    # the part no change of reference frame can remove: the error less its mean over the particles
    # (the consensus map's conformation is a blur of the ensemble, not the truth's reference state)
    offset_ms = float(((total / len(state)) ** 2).sum(axis=-1).mean() * pixel_size**2)
    row["frame_offset_rms_A"] = round(float(np.sqrt(offset_ms)), 4)
    row["frame_free_rms_A"] = round(float(np.sqrt(max(row["rms_A"] ** 2 - offset_ms, 0.0))), 4)
    return row


def beam_split_rms(
    error: Callable[[slice], np.ndarray], truth: dict[str, np.ndarray], unit: float, chunk: int = 500
) -> dict[str, float]:
    """RMS (Å) over atoms and particles of a per-particle error, total, in-plane and along the beam.

    ``error(rows)`` is the ``(b, N, 3)`` error of those particles in units of ``unit`` Å; each is
    rotated by its particle's RELION matrix A (``truth``'s ``rot``, ``tilt``, ``psi``), whose
    third row is the beam.
    """
    a = euler_to_matrix(truth["rot"], truth["tilt"], truth["psi"])
    sums = np.zeros(2)
    n_atoms = 0
    for lo in range(0, len(a), chunk):
        sl = slice(lo, lo + chunk)
        err = error(sl)
        rotated = np.einsum("bij,bnj->bni", a[sl], err)
        sums += [(rotated[..., :2] ** 2).sum(), (rotated[..., 2] ** 2).sum()]
        n_atoms += err.shape[0] * err.shape[1]
    return {
        "rms_A": round(float(np.sqrt(sums.sum() / n_atoms) * unit), 4),
        "in_plane_rms_A": round(float(np.sqrt(sums[0] / n_atoms) * unit), 4),
        "along_beam_rms_A": round(float(np.sqrt(sums[1] / n_atoms) * unit), 4),
    }


def representation_residual(
    truth: dict[str, np.ndarray], degrees: tuple[int, int], basis: str, box: int, pixel_size: float
) -> np.ndarray:
    """``(S, N, 3)`` px: per-state least-squares fit of the true displacements at the reference
    atoms in the basis, minus the truth (the best any field of that degree can do)."""
    coords, ref = truth["coords"], int(truth["reference"])
    ref_px = coords[ref] / pixel_size
    z = zk.evaluate_basis(ref_px, *degrees, box / 2, basis)
    out = np.empty_like(coords)
    for k in range(len(coords)):
        d = (coords[k] - coords[ref]) / pixel_size
        c = zk.fit_coefficients(ref_px, d, *degrees, box / 2, basis)
        out[k] = zk.deformation_field(z, c) - d
    return out


def landscape(coefficients: np.ndarray, truth: dict[str, np.ndarray]) -> dict[str, float]:
    """|Spearman| PC1 vs each true coordinate and leave-one-out k-NN R² of each coordinate."""
    coordinate = truth["coordinate"][truth["state"]]
    out: dict[str, float] = {}
    for j, name in enumerate(truth["names"]):
        m = landscape_metrics(coefficients, coordinate[:, j])
        out[f"spearman_pc1_{name}"] = m["spearman_pc1_t"]
        out[f"knn_r2_{name}"] = m["knn_r2_t"]
    return out


def map_metrics(volume: np.ndarray, truth_map: np.ndarray, pixel_size: float) -> dict[str, float]:
    fsc = fourier_shell_correlation(volume, truth_map, pixel_size)
    return {"fsc_area": round(fsc_area(fsc), 4), "resolution_fsc0.5_A": round(resolution_at(fsc, 0.5), 3)}


# ----------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------
def parse_set(items: list[str]) -> dict[str, Any]:
    """``["train.epochs=10", "rounds=2"]`` → nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        holder = out
        parts = key.split(".")
        for p in parts[:-1]:
            holder = holder.setdefault(p, {})
        holder[parts[-1]] = yaml.safe_load(value)
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def consensus(data: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The consensus reference and mask from the noisy particles alone (cached)."""
    out = data / "consensus"
    ref, mask, info = out / "reference.mrc", out / "mask.mrc", out / "info.json"
    if not info.exists():
        from z3lib.consensus import consensus_reference

        out.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        stats = consensus_reference(data / "particles.star", ref, mask, seed=0, backend="numpy", log=log)
        row = {k: v for k, v in stats.items() if isinstance(v, float)}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        info.write_text(json.dumps(row))
    return ref, mask, json.loads(info.read_text())


def run_pipeline(workdir: Path, run: str, config: dict[str, Any], full: bool) -> float:
    """Run the Snakemake workflow in ``workdir`` (resumes; a finished run returns at once)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text((ROOT / "config.yaml").read_text())  # the defaults a clone has
    cfg = workdir / "yardstick.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    targets = [] if full else [f"results/{run}/zart/corrected.mrc", f"results/{run}/predict/coefficients.npy"]
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--workflow-profile",
        str(ROOT / "profiles" / "ci"),
        "--configfile",
        str(cfg),
        "--cores",
        "2",
        *targets,
    ]
    t0 = time.perf_counter()
    with (workdir / "snakemake.log").open("a") as fh:
        fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        fh.flush()
        result = subprocess.run(cmd, cwd=workdir, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if result.returncode:
        raise RuntimeError(f"snakemake failed (exit {result.returncode}); see {workdir / 'snakemake.log'}")
    return time.perf_counter() - t0


def stage_times(workdir: Path, run: str, n: int) -> dict[str, dict[str, float]]:
    """Per rule, from Snakemake's benchmark files: wall seconds (scattered chunks summed), images/s
    (``n`` / seconds) and peak resident memory (MB, the largest chunk)."""
    out: dict[str, dict[str, float]] = {}
    root = workdir / "benchmarks" / run
    for path in sorted(root.rglob("*.tsv")):
        # benchmarks/<run>/<rule>.tsv, <run>/rounds/<k>/<rule>.tsv, <run>/<rule>/<chunk>.tsv and
        # <run>/rounds/<k>/<rule>/<chunk>.tsv (scattered chunks): key = "round<k>/<rule>"
        rel = path.relative_to(root).with_suffix("").parts
        prefix = f"round{rel[1]}/" if rel[0] == "rounds" and len(rel) > 2 else ""
        body = rel[2:] if prefix else rel
        rule = prefix + (body[0] if len(body) > 1 else body[-1])
        lines = path.read_text().splitlines()
        if len(lines) < 2:
            continue
        head, vals = lines[0].split("\t"), lines[1].split("\t")
        rec = dict(zip(head, vals, strict=True))
        cur = out.setdefault(rule, {"wall_s": 0.0, "max_rss_mb": 0.0})
        cur["wall_s"] = round(cur["wall_s"] + float(rec["s"]), 1)
        if rec.get("max_rss", "NA") not in ("NA", "-"):
            cur["max_rss_mb"] = max(cur["max_rss_mb"], round(float(rec["max_rss"]), 1))
    for cur in out.values():
        cur["images_per_s"] = round(n / cur["wall_s"], 1) if cur["wall_s"] else 0.0
    return out


def training_rate(workdir: Path, run: str) -> float | None:
    """Mean images/s over the training epochs of every round and half (``train*.log``)."""
    paths = sorted((workdir / "logs" / run).rglob("train*.log"))
    rates = [float(m) for path in paths for m in re.findall(r"epoch \d+ done:.*?([\d.]+) images/s", path.read_text())]
    return round(float(np.mean(rates)), 1) if rates else None


def half_average_zart(
    star: Path,
    pts: np.ndarray,
    basis: np.ndarray | None,
    coeffs: np.ndarray | None,
    box: int,
    apix: float,
    zc: dict[str, Any],
    seed: int,
    label: str,
) -> np.ndarray:
    """Average of the two gold-standard half maps that ``reconstruct_zart`` makes from the
    particles of ``star`` (fields ``coeffs`` on the basis values ``basis``; None = zero fields)."""
    from z3lib.io import read_particles
    from z3lib.zart import ZartConfig, get_backend, half_sets, reconstruct_zart, values_to_volume

    parts = read_particles(star)
    config = ZartConfig(**{**zc, "sigmas": tuple(zc["sigmas"])}, seed=seed)
    stack = parts.images()
    halves = []
    for rows in half_sets(parts.table["random_subset"].to_numpy(), seed):
        vals, _ = reconstruct_zart(
            get_backend("numpy"), pts, basis, coeffs, stack, parts.table, rows, box, apix, config, log=log, label=label
        )
        halves.append(values_to_volume(vals, pts, box))
    stack.close()
    return 0.5 * (halves[0] + halves[1])


def oracle_map(data: Path, workdir: Path, run: str, reference: Path, mask: Path, cfg: dict[str, Any]) -> np.ndarray:
    """Half-map average of the oracle particles, preprocessed like the pipeline's and reconstructed
    by ``reconstruct_zart`` with zero fields on the pipeline's point cloud and ZART settings."""
    from z3lib.io import read_npz
    from z3lib.stages.preprocess import preprocess

    pts_path = workdir / "results" / run / "preprocess" / "points.npz"
    zc = dict(cfg["zart"])
    for name in ("backend", "field_scale"):  # neither changes a zero-field reconstruction
        zc.pop(name, None)
    key = digest(
        {
            "zart": zc,
            "pre": cfg["preprocess"],
            "box": cfg["box"],
            "seed": cfg["seed"],
            "points": hashlib.sha256(pts_path.read_bytes()).hexdigest(),
        }
    )
    out = data / f"oracle_{key}"
    cached = out / "oracle.npy"
    if cached.exists():
        return np.load(cached)
    pre = preprocess(
        data / "oracle" / "particles.star",
        reference,
        mask,
        out / "pre",
        box=cfg["box"],
        mask_threshold=cfg["preprocess"]["mask_threshold"],
        points_step=cfg["preprocess"]["points_step"],
        log=log,
    )
    cloud = read_npz(pts_path)
    pts, box, apix = np.asarray(cloud["points"], np.float64), int(cloud["box"]), float(cloud["pixel_size"])
    vol = half_average_zart(pre["particles"], pts, None, None, box, apix, zc, cfg["seed"], " oracle")
    np.save(cached, vol)
    return vol


def smooth_true_fits(
    points: np.ndarray, truth: dict[str, np.ndarray], degrees: tuple[int, int], basis: str, box: int, apix: float
) -> np.ndarray:
    """``(S, 3K)`` px: per state, the least-squares fit over ``points`` (px) of the true
    displacement spread smoothly from the reference atoms (Gaussian weights, σ 1.5 px, 16 nearest
    atoms): the true fields in a basis, defined over the whole mask rather than only at the atoms."""
    from scipy.spatial import cKDTree

    coords, ref = truth["coords"], int(truth["reference"])
    dist, idx = cKDTree(coords[ref] / apix).query(points, k=16)
    w = np.exp(-0.5 * (dist / 1.5) ** 2) + 1e-12
    w /= w.sum(1, keepdims=True)
    return np.stack(
        [
            zk.fit_coefficients(
                points, np.einsum("nk,nka->na", w, ((c - coords[ref]) / apix)[idx]), *degrees, box / 2, basis
            )
            for c in coords
        ]
    )


def true_field_map(
    data: Path,
    workdir: Path,
    run: str,
    truth: dict[str, np.ndarray],
    degrees: tuple[int, int],
    basis: str,
    cfg: dict[str, Any],
) -> np.ndarray:
    """Half-map average of the pipeline's own particles reconstructed by ``reconstruct_zart``
    with the *true* fields in the pipeline's basis: per state, the least-squares fit over the
    pipeline's mask points of the true displacement spread smoothly from the atoms (Gaussian
    weights, σ 1.5 px, 16 nearest atoms). What a perfect field estimate of this degree gives:
    the ceiling of the corrected map for the basis (the oracle is the ceiling of any method)."""

    from z3lib.io import read_npz

    res = workdir / "results" / run
    pts_path = res / "preprocess" / "points.npz"
    zc = dict(cfg["zart"])
    for name in ("backend", "field_scale"):  # the true fields are used as they are
        zc.pop(name, None)
    key = digest(
        {
            "zart": zc,
            "degrees": list(degrees),
            "basis": basis,
            "seed": cfg["seed"],
            "points": hashlib.sha256(pts_path.read_bytes()).hexdigest(),
        }
    )
    cached = data / f"true_fields_{key}.npy"
    if cached.exists():
        return np.load(cached)
    cloud = read_npz(pts_path)
    pts, box, apix = np.asarray(cloud["points"], np.float64), int(cloud["box"]), float(cloud["pixel_size"])
    fits = smooth_true_fits(pts, truth, degrees, basis, box, apix)
    z = zk.evaluate_basis(pts, *degrees, box / 2, basis).astype(np.float32)
    vol = half_average_zart(
        res / "preprocess" / "particles.star",
        pts,
        z,
        fits[truth["state"]].astype(np.float32),
        box,
        apix,
        zc,
        cfg["seed"],
        " true fields",
    )
    np.save(cached, vol)
    return vol


def dataset_checks(data: Path, params: SimParams, truth: dict[str, np.ndarray]) -> dict[str, float]:
    """What ``z3lib.io.read_particles`` makes of the simulated STAR, against the simulation's own
    record: pose agreement, shift and defocus-angle ranges, and the correlation of 16 clean images
    with z3's renderer of the same atoms through the poses, shifts and CTFs read back (≈ 1 when
    the simulator, the STAR and z3 agree on every convention; negative on a CTF sign error)."""
    from dataclasses import replace

    from yardstick_sim import load_atoms, z3_images

    from z3lib.io import read_particles

    t = read_particles(data / "particles.star").table
    k = 16
    meta = {
        "_rlnAngleRot": t["rot"].to_numpy()[:k],
        "_rlnAngleTilt": t["tilt"].to_numpy()[:k],
        "_rlnAnglePsi": t["psi"].to_numpy()[:k],
        "_rlnOriginXAngst": t["shift_x"].to_numpy()[:k] * params.pixel_size,
        "_rlnOriginYAngst": t["shift_y"].to_numpy()[:k] * params.pixel_size,
        "_rlnDefocusU": t["defocus_u"].to_numpy()[:k],
        "_rlnDefocusV": t["defocus_v"].to_numpy()[:k],
        "_rlnDefocusAngle": t["defocus_angle"].to_numpy()[:k],
    }
    ref = z3_images(replace(params, n=k), truth["coords"], load_atoms().elements, truth["state"][:k], meta)
    sim = truth["clean_sample"][:k]
    corr = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(sim, ref, strict=True)]
    rot_err = float(
        np.abs(
            euler_to_matrix(t["rot"], t["tilt"], t["psi"]) - euler_to_matrix(truth["rot"], truth["tilt"], truth["psi"])
        ).max()
    )
    return {
        "pose_matrix_max_abs_diff": round(rot_err, 6),
        "shift_rms_px": round(float(np.sqrt((t["shift_x"] ** 2 + t["shift_y"] ** 2).mean() / 2)), 3),
        "defocus_angle_deg_range": [
            round(float(t["defocus_angle"].min()), 1),
            round(float(t["defocus_angle"].max()), 1),
        ],
        "defocus_u_A_range": [round(float(t["defocus_u"].min())), round(float(t["defocus_u"].max()))],
        "clean_image_corr_vs_z3_renderer_mean": round(float(np.mean(corr)), 4),
        "clean_image_corr_vs_z3_renderer_min": round(float(np.min(corr)), 4),
        "star_columns": sorted(read_star_columns(data / "particles.star")),
    }


def read_star_columns(path: Path) -> set[str]:
    return {line.split()[0] for line in path.read_text().splitlines() if line.startswith("_rln")}


def half_average(folder: Path, name: str) -> np.ndarray:
    from z3lib.io import read_map

    return 0.5 * (read_map(folder / f"{name}_half1.mrc").data + read_map(folder / f"{name}_half2.mrc").data)


def chosen_field_scale(zart: Path) -> float | None:
    """The field scale ZART chose (``zart/field_scale.tsv``, row ``chosen``); None without the table."""
    import pandas as pd

    table = zart / "field_scale.tsv"
    if not table.exists():
        return None
    scales = pd.read_csv(table, sep="\t")
    return float(scales.loc[scales["chosen"].astype(str) == "True", "scale"].iloc[0])


def half_map_fsc(path: Path) -> dict[str, float]:
    """The pipeline's own gold-standard figures (``zart/fsc.tsv``, no ground truth): FSC area and
    0.143 resolution of the corrected and uncorrected half maps. With ``gold_standard: shared`` the
    halves share a network, so these can exceed what the halves' content warrants."""
    import pandas as pd

    from z3lib.analysis import fsc_summary

    table = pd.read_csv(path, sep="\t")
    out = {}
    for name in ("corrected", "uncorrected"):
        out[f"{name}_fsc_area"] = round(fsc_area(pd.DataFrame({"fsc": table[f"fsc_{name}"]})), 4)
        out[f"{name}_fsc0.143_A"] = round(fsc_summary(table, f"fsc_{name}")["fsc_0.143"], 3)
    return out


def round_metrics(
    workdir: Path,
    run: str,
    truth: dict[str, np.ndarray],
    degrees: tuple[int, int],
    basis: str,
    box: int,
    apix: float,
    truth_map: np.ndarray,
    areas: dict[str, float],
) -> list[dict[str, Any]]:
    """Every refinement round's figures (``results/<run>/rounds/<k>/``): the refined landscape and
    displacement error, the corrected map's FSC area and the gap it closes (against the final
    round's uncorrected and oracle maps), the field scale ZART chose and each stage's wall time."""

    from z3lib.io import read_coefficients

    rounds_dir = workdir / "results" / run / "rounds"
    times = stage_times(workdir, run, len(truth["state"]))
    gap = areas["oracle"] - areas["uncorrected"]
    out = []
    for k in sorted(int(p.name) for p in rounds_dir.iterdir() if p.name.isdigit()):
        folder = rounds_dir / str(k)
        if not (folder / "zart" / "corrected_half1.mrc").exists():
            continue
        c = read_coefficients(folder / "refine" / "coefficients.npy")
        corrected = map_metrics(half_average(folder / "zart", "corrected"), truth_map, apix)
        out.append(
            {
                "round": k,
                "landscape_refine": landscape(c, truth),
                "displacement_refine": field_errors(c, truth, degrees, basis, box, apix),
                "corrected": corrected,
                "fsc_area_gap_closed": round((corrected["fsc_area"] - areas["uncorrected"]) / gap, 3) if gap else None,
                "zart_field_scale": chosen_field_scale(folder / "zart"),
                "stage_wall_s": {
                    key.split("/", 1)[1]: v["wall_s"] for key, v in times.items() if key.startswith(f"round{k}/")
                },
            }
        )
    return out


# ----------------------------------------------------------------------------------------------
def measure(
    job: str, degree: str, extra: dict[str, Any], full: bool, smoke: bool, model_which: str = ""
) -> dict[str, Any]:
    from z3lib.io import read_coefficients, read_map

    scenario, source, n = job.split(":")
    l1, l2, basis = degree.split(",")
    params = SimParams(scenario=scenario, source=source, n=int(n))
    data = YARD / "data" / f"{scenario}_{source}_n{n}_{params.key()}"
    t0 = time.perf_counter()
    simulate(params, data, log=log.info)
    t_sim = time.perf_counter() - t0
    reference, mask, cons = consensus(data)
    config = {
        "run": f"{scenario}_{source}_n{n}_L{l1}_{l2}_{basis}",
        "particles": str(data / "particles.star"),
        "reference": str(reference),
        "mask": str(mask),
        "box": params.box,
        "zernike": {"L1": int(l1), "L2": int(l2), "basis": basis},
    }
    config = merge(config, extra)
    truth = dict(np.load(data / "truth" / "truth.npz"))
    if model_which:
        config["model"] = str(model_file(data, model_which, truth, params.box, params.pixel_size))
        config["run"] += f"_model_{model_which}"
    run = config["run"]
    workdir = YARD / "runs" / f"{data.name}_{digest(config)}"
    log.info("pipeline %s in %s", run, workdir)
    wall = run_pipeline(workdir, run, config, full)
    defaults = yaml.safe_load((ROOT / "config.yaml").read_text())
    effective = merge(defaults, config)
    truth["names"] = [str(x) for x in truth["names"]]
    res = workdir / "results" / run
    box, apix = params.box, params.pixel_size
    row: dict[str, Any] = {
        "benchmark": "yardstick",
        "scenario": scenario,
        "source": source,
        "particles": int(n),
        "box": box,
        "pixel_size_A": apix,
        "snr": params.snr,
        "L1": int(l1),
        "L2": int(l2),
        "basis": basis,
        "extra_config": extra,
        "model": model_which or None,
        "smoke": smoke,
        "dataset": data.name,
        "workdir": str(workdir.relative_to(ROOT)),
        "reference_state": "truth's middle state (the consensus the pipeline uses is a blur of the ensemble)",
        "consensus": cons,
        "dataset_checks": dataset_checks(data, params, truth),
    }
    # landscape
    for stage in ("predict", "refine"):
        c = read_coefficients(res / stage / "coefficients.npy")
        row[f"landscape_{stage}"] = landscape(c, truth)
        row[f"displacement_{stage}"] = field_errors(c, truth, (int(l1), int(l2)), basis, box, apix)
    row["displacement_zero_field"] = field_errors(None, truth, (int(l1), int(l2)), basis, box, apix)
    if model_which:
        spec = zk.ZernikeSpec(int(l1), int(l2), basis, box)
        row["model_vs_truth"] = {
            stage: model_metrics(
                Path(config["model"]), read_coefficients(res / stage / "coefficients.npy"), truth, spec, apix
            )
            for stage in ("predict", "refine")
        }
    row["representation_limit"] = {
        f"{a}_{b}_{c}": field_errors(
            None, truth, (a, b), c, box, apix, residual=representation_residual(truth, (a, b), c, box, apix)
        )
        for a, b, c in LIMIT_DEGREES
    }
    # maps
    truth_map = read_map(data / "truth" / "reference_state.mrc").data
    maps = {
        "uncorrected": half_average(res / "zart", "uncorrected"),
        "corrected": half_average(res / "zart", "corrected"),
        "oracle": oracle_map(data, workdir, run, reference, mask, effective),
        "true_fields": true_field_map(data, workdir, run, truth, (int(l1), int(l2)), basis, effective),
    }
    row["maps_vs_truth"] = {k: map_metrics(v, truth_map, apix) for k, v in maps.items()}
    a = {k: v["fsc_area"] for k, v in row["maps_vs_truth"].items()}
    gap = a["oracle"] - a["uncorrected"]
    row["fsc_area_gap_closed"] = round((a["corrected"] - a["uncorrected"]) / gap, 3) if gap else None
    row["fsc_area_gap_closed_true_fields"] = round((a["true_fields"] - a["uncorrected"]) / gap, 3) if gap else None
    row["half_map_fsc"] = half_map_fsc(res / "zart" / "fsc.tsv")
    row["rounds"] = round_metrics(workdir, run, truth, (int(l1), int(l2)), basis, box, apix, truth_map, a)
    if (scale := chosen_field_scale(res / "zart")) is not None:
        row["zart_field_scale"] = scale
    row["training_images_per_s"] = training_rate(workdir, run)
    row["stages"] = stage_times(workdir, run, int(n))
    row["pipeline_wall_s_this_call"] = round(wall, 1)
    row["simulate_wall_s_this_call"] = round(t_sim, 1)
    row["host"] = platform.node()
    row["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return row


def model_file(data: Path, which: str, truth: dict[str, np.ndarray], box: int, pixel_size: float) -> Path:
    """The demo's closed or open AdK crystal structure (heavy atoms) placed in the dataset's map frame.

    The model a user would dock into the consensus map: one crystal structure, placed by its CORE
    (which no scenario moves) on the simulation's frame, i.e. a perfect rigid fit. It is the
    simulation's reference state only where that state is the crystal structure itself (hinge and
    two_motions with ``closed``): use ``open`` there.
    """
    from yardstick_sim import DEMO, LID, NMP, in_range, load_atoms

    from z3lib.atoms import heavy_atoms
    from z3lib.io import read_model

    out = data / f"model_{which}.pdb"
    if out.exists():
        return out
    atoms = load_atoms()
    core = ~in_range(atoms.residues, LID) & ~in_range(atoms.residues, NMP)
    reference = truth["coords"][int(truth["reference"])]
    offset = (atoms.closed[core] - reference[core]).mean(0)  # the simulation's centring (a translation)
    xyz = getattr(atoms, which) - offset + (box // 2) * pixel_size
    source = read_model(DEMO / f"adk_{which}.pdb")
    heavy = heavy_atoms(source.elements)
    if heavy.sum() != len(xyz):
        raise ValueError(f"adk_{which}.pdb: {heavy.sum()} heavy atoms, the simulation {len(xyz)}")
    lines = []
    for k, (row, (x, y, z)) in enumerate(zip(np.flatnonzero(heavy).tolist(), xyz.tolist(), strict=True)):
        name, element = str(source.atom_names[row]), str(source.elements[row]).upper()
        lines.append(
            f"ATOM  {k + 1:5d} {name if len(name) == 4 else ' ' + name:<4s} {source.residue_names[row]:>3s} "
            f"{(source.chain_ids[row] or 'A')[:1]}{int(source.residue_numbers[row]):4d}    "
            f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {element:>2s}"
        )
    out.write_text("\n".join([*lines, "END"]) + "\n")
    return out


def model_metrics(
    model: Path, coefficients: np.ndarray, truth: dict[str, np.ndarray], spec: zk.ZernikeSpec, pixel_size: float
) -> dict[str, Any]:
    """The model deformed by each particle's field against that particle's true state.

    RMSD (Å, heavy atoms) per particle, mean over particles, deformed and as given; and the
    deformed models' covalent geometry (:func:`z3lib.atoms.geometry_stats`) over 200 particles.
    """
    from z3lib import atoms as at
    from z3lib.analysis import deform_model
    from z3lib.io import read_model

    atomic = read_model(model)
    xyz = atomic.coords
    true = truth["coords"][truth["state"]] + (spec.box // 2) * pixel_size  # (n, N, 3) map frame
    moved = np.concatenate(
        [deform_model(xyz, coefficients[i : i + 200], spec, pixel_size) for i in range(0, len(coefficients), 200)]
    )
    rmsd = np.sqrt(((moved - true) ** 2).sum(-1).mean(-1))
    rmsd0 = np.sqrt(((xyz[None] - true) ** 2).sum(-1).mean(-1))
    pairs = at.model_pairs(xyz, atomic.atom_names, atomic.chain_ids, atomic.residue_numbers)
    sample = np.random.default_rng(0).choice(len(moved), size=min(200, len(moved)), replace=False)
    geometry = [at.geometry_stats(xyz, moved[i], pairs) for i in sample]
    return {
        "model": model.name,
        "rmsd_to_true_state_A": {
            "deformed_mean": round(float(rmsd.mean()), 4),
            "as_given_mean": round(float(rmsd0.mean()), 4),
        },
        "deformed_geometry_mean": {k: round(float(np.mean([g[k] for g in geometry])), 4) for k in geometry[0]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--jobs",
        nargs="+",
        default=["hinge:aspire:5000"],
        help="scenario:source:n (hinge|path|two_motions : aspire|z3 : particles)",
    )
    parser.add_argument("--degrees", nargs="+", default=["3,2,xmipp", "7,7,orthonormal"])
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra pipeline config (dotted keys, YAML values), e.g. rounds=2",
    )
    parser.add_argument(
        "--model",
        choices=["", "closed", "open"],
        default="",
        help="give the run an atomic model (config model): the closed or open AdK crystal structure docked in the map",
    )
    parser.add_argument("--smoke", action="store_true", help="500 particles per job (ignores n)")
    parser.add_argument("--full", action="store_true", help="run the default target (report too)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    # importing aspire writes logs/ into the working directory and disables existing loggers:
    # import it first, from a scratch folder, then set ours up
    scratch = YARD / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    here = Path.cwd()
    os.chdir(scratch)
    import aspire  # noqa: F401

    os.chdir(here)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("z3", "yardstick")):
            logging.getLogger(name).disabled = False
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    extra = parse_set(args.set)
    for job in args.jobs:
        if args.smoke:
            job = ":".join(job.split(":")[:2] + ["500"])
        for degree in args.degrees:
            try:
                row = measure(job, degree, extra, args.full, args.smoke, args.model)
            except Exception as exc:  # one failure must not hide the other figures
                log.exception("job %s %s failed", job, degree)
                row = {
                    "benchmark": "yardstick",
                    "job": job,
                    "degree": degree,
                    "extra_config": extra,
                    "failed": f"{type(exc).__name__}: {exc}",
                }
            emit(row, None if args.smoke and args.out == RESULTS else args.out)


if __name__ == "__main__":
    main()
