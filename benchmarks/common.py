"""Shared helpers of the benchmarks: content-keyed caches (the demo simulation, network runs)
and ground-truth metrics.

Every cache under ``benchmarks/work/`` (git-ignored) is named by a key that hashes all the
parameters that define it and the source of the code that makes it (the z3lib modules it
imports, transitively, the benchmark files given, ``z3lib.__version__`` and the numpy and torch
versions), so a benchmark never reports numbers of older code or other settings: a change of
either makes a new cache. A cache folder counts only once its ``cache_key.json`` is written,
last; an incomplete one is removed and made again.
"""

from __future__ import annotations

import ast
import hashlib
import json
import resource
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from z3lib import zernike as zk
from z3lib.simulate import load_motion
from z3lib.stages.preprocess import preprocess
from z3lib.stages.simulate import simulate_dataset

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work"
COMPLETE = "cache_key.json"


def _module_file(name: str) -> Path | None:
    """``z3lib.x.y`` → its source file under the repository root (None: not a module file)."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def z3lib_sources(*modules: str) -> list[Path]:
    """Source files of the z3lib ``modules`` and of every z3lib module they import, directly or
    not (imports inside functions included), with the packages that hold them; sorted."""
    todo, seen = ["z3lib", *modules], {}
    while todo:
        name = todo.pop()
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] == "z3lib"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] == "z3lib":
                    todo += [module] + [f"{module}.{a.name}" for a in node.names]  # from z3lib import zernike
    return sorted(set(seen.values()))


def cache_key(params: Mapping[str, Any], modules: Sequence[str] = (), files: Sequence[Path] = ()) -> str:
    """16 hex digits of the SHA-256 of ``params`` (JSON, sorted keys), the text of
    :func:`z3lib_sources` of ``modules`` and of ``files``, ``z3lib.__version__`` and the numpy
    and torch versions."""
    import torch

    import z3lib

    h = hashlib.sha256()
    h.update(json.dumps(dict(params), sort_keys=True, default=str).encode())
    h.update(f"z3lib {z3lib.__version__} numpy {np.__version__} torch {torch.__version__}\n".encode())
    for path in [*z3lib_sources(*modules), *(Path(f).resolve() for f in files)]:
        h.update(f"\0{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes (an input's content in a cache key)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cache_dir(kind: str, params: Mapping[str, Any], modules: Sequence[str] = (), files: Sequence[Path] = ()) -> Path:
    """``benchmarks/work/<kind>_<cache_key>``; not created."""
    return WORK / f"{kind}_{cache_key(params, modules, files)}"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished cache (see :func:`mark_complete`)."""
    return (folder / COMPLETE).is_file()


def start_cache(folder: Path) -> Path:
    """An empty ``folder`` to make a cache in (what an interrupted attempt left is removed)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def mark_complete(folder: Path, params: Mapping[str, Any]) -> None:
    """Mark ``folder`` finished: write its parameters to ``cache_key.json`` (atomically, last)."""
    from z3lib.io import atomic_path

    with atomic_path(folder / COMPLETE) as tmp:
        tmp.write_text(
            json.dumps(
                {"params": dict(params), "made": time.strftime("%Y-%m-%d %H:%M:%S")},
                sort_keys=True,
                default=str,
                indent=1,
            )
        )


def demo_dataset(
    n: int = 5000,
    box: int = 64,
    snr: float = 0.1,
    seed: int = 0,
    processing_box: int | None = None,
    pixel_size: float = 2.0,
) -> dict[str, Path]:
    """The demo simulation (AdK, 2 Å/px, resolution 5 Å) and its preprocessing, cached in
    ``benchmarks/work/`` (keyed by content, see the module's docstring) so that benchmarks share
    it. ``out["key"]`` is a file whose name carries both keys (a key for caches made from it)."""
    pbox = processing_box or box
    start, end = ROOT / "resources/demo/adk_closed.pdb", ROOT / "resources/demo/adk_open.pdb"
    sim_params = {
        "n": n,
        "box": box,
        "snr": snr,
        "seed": seed,
        "pixel_size": pixel_size,
        "resolution": 5.0,
        "start_model": file_digest(start),
        "end_model": file_digest(end),
    }
    sim_dir = cache_dir("sim", sim_params, ["z3lib.stages.simulate"], [Path(__file__)])
    if not is_complete(sim_dir):
        simulate_dataset(
            start_cache(sim_dir),
            start_model=start,
            end_model=end,
            n_particles=n,
            box=box,
            pixel_size=pixel_size,
            resolution=5.0,
            snr=snr,
            seed=seed,
        )
        mark_complete(sim_dir, sim_params)
    pre_params = {"simulation": sim_dir.name, "box": pbox}
    pre_dir = cache_dir("pre", pre_params, ["z3lib.stages.preprocess"], [Path(__file__)])
    if not is_complete(pre_dir):
        preprocess(
            sim_dir / "particles.star", sim_dir / "reference.mrc", sim_dir / "mask.mrc", start_cache(pre_dir), box=pbox
        )
        mark_complete(pre_dir, pre_params)
    names = (
        "particles.star",
        "ground_truth.tsv",
        "motion.npz",
        "reference.mrc",
        "mask.mrc",
        "truth_reference.mrc",
        "state_start.mrc",
        "state_end.mrc",
    )
    out = {f"sim_{p.split('.')[0]}": sim_dir / p for p in names}
    out.update(
        {f"pre_{p.split('.')[0]}": pre_dir / p for p in ("particles.star", "points.npz", "reference.mrc", "mask.mrc")}
    )
    out["key"] = pre_dir / COMPLETE
    return out


def network_run(data: dict[str, Path], config: Any, device: str, *, fresh: bool = False) -> dict[str, Any]:
    """Zernike3Deep trained on ``data`` (:func:`demo_dataset`) with ``config`` (a
    ``NetworkConfig``) and its predictions for every particle, cached by content (the data's
    key, every setting, the device, the code). ``fresh``: train again even when cached (timing).

    Returns ``{"dir", "model", "history", "coefficients"}`` paths, and ``train_s`` /
    ``predict_s`` (wall seconds; None when read from the cache).
    """
    from z3lib.stages.predict import predict
    from z3lib.stages.train import train

    params = {"data": data["key"].parent.name, "config": config.to_dict(), "device": device}
    out = cache_dir("z3deep", params, ["z3lib.stages.train", "z3lib.stages.predict"], [Path(__file__)])
    times: dict[str, float | None] = {"train_s": None, "predict_s": None}
    if fresh or not is_complete(out):
        start_cache(out)
        t0 = time.perf_counter()
        paths = train(data["pre_particles"], data["pre_points"], out, config, device=device)
        t1 = time.perf_counter()
        predict(paths["model"], data["pre_particles"], data["sim_particles"], out / "predict", device=device)
        times = {"train_s": t1 - t0, "predict_s": time.perf_counter() - t1}
        mark_complete(out, params)
    return {
        "dir": out,
        "model": out / "model.pt",
        "history": out / "history.tsv",
        "coefficients": out / "predict" / "coefficients.npy",
        **times,
    }


def cached_array(
    kind: str, params: Mapping[str, Any], modules: Sequence[str], files: Sequence[Path], make: Any
) -> np.ndarray:
    """``make()`` (an array), cached in ``benchmarks/work/<kind>_<key>.npy`` by content
    (:func:`cache_key` of ``params``, ``modules`` and ``files``); written atomically."""
    from z3lib.io import atomic_path

    path = WORK / f"{kind}_{cache_key(params, modules, files)}.npy"
    if path.is_file():
        return np.load(path)
    arr = np.asarray(make())
    with atomic_path(path) as tmp:
        np.save(tmp, arr)
    return arr


def displacement_metrics(
    coefficients: np.ndarray, t: np.ndarray, motion_path: Path, degrees: tuple[int, int], basis: str, box: int
) -> dict[str, float]:
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
    return {
        "displacement_rms_error_A": round(err, 4),
        "zero_field_rms_A": round(zero, 4),
        "representation_limit_A": round(limit, 4),
        "error_over_limit": round(err / limit, 3),
    }


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
