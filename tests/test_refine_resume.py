"""Refinement progress: an interrupted chunk resumes to the uninterrupted result, and partial
state made from other predictions, settings, point cloud or library version is never reused."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import z3lib
import z3lib.refine_run as refine_module
from z3lib.io import read_npz, write_coefficients, write_npz
from z3lib.io.journal import Journal
from z3lib.refine import RefineConfig
from z3lib.stages.preprocess import preprocess
from z3lib.stages.refine import refine_chunk
from z3lib.stages.simulate import simulate_dataset

ADK = Path(__file__).parent / "data" / "mdanalysistests_adk"
N = 24
CFG = RefineConfig(steps=5, grid_points=5, batch_size=8)  # 3 batches of 8 in one chunk
KW: dict[str, Any] = {"chunk": 0, "n_chunks": 1, "zernike": {"L1": 3, "L2": 2, "basis": "xmipp"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refine_resume")
    sim = simulate_dataset(
        root / "sim",
        start_model=ADK / "adk_closed.pdb",
        end_model=ADK / "adk_open.pdb",
        n_particles=N,
        box=32,
        pixel_size=4.0,
        resolution=10.0,
        snr=1.0,
        seed=4,
    )
    pre = preprocess(sim["particles"], sim["reference"], sim["mask"], root / "pre", box=24)
    rng = np.random.default_rng(5)
    for name in ("prior_a", "prior_b"):  # two unrelated sets of predictions
        write_coefficients(
            root / f"{name}.npy", np.outer(rng.uniform(-1, 1, N), rng.normal(size=39)) + 0.05 * rng.normal(size=(N, 39))
        )
    cloud = read_npz(pre["points"])
    other = {**cloud, "amplitudes": cloud["amplitudes"] * rng.uniform(0.3, 1.7, len(cloud["amplitudes"]))}
    write_npz(root / "points_b.npz", **other)
    return {
        "particles": pre["particles"],
        "points": pre["points"],
        "points_b": root / "points_b.npz",
        "prior_a": root / "prior_a.npy",
        "prior_b": root / "prior_b.npy",
        "root": root,
    }


class _Counter:
    """Wraps ``refine_batch``: counts calls, and raises (a kill) once ``stop_after`` calls are done."""

    def __init__(self, real: Callable[..., Any], stop_after: int | None = None) -> None:
        self.real, self.stop_after, self.calls = real, stop_after, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int | None], _Counter]]:
    real = refine_module.refine_batch

    def install(stop_after: int | None = None) -> _Counter:
        counter = _Counter(real, stop_after)
        monkeypatch.setattr(refine_module, "refine_batch", counter)
        return counter

    yield install


def _run(
    tiny: dict[str, Path],
    out: str,
    *,
    prior: str = "prior_a",
    points: str = "points",
    config: RefineConfig = CFG,
    progress: Path | None = None,
    **kw: Any,
) -> dict[str, np.ndarray]:
    path = refine_chunk(
        tiny["particles"],
        tiny[points],
        tiny[prior],
        tiny["root"] / out,
        config=config,
        progress_path=progress,
        **{**KW, **kw},
    )
    return read_npz(path)


def _interrupt(tiny: dict[str, Path], counted: Callable[[int | None], _Counter], progress: Path, **kw: Any) -> None:
    """A run killed after its first batch: the progress file holds that batch only."""
    counted(1)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, "killed.npz", progress=progress, **kw)
    assert progress.exists() or progress.with_suffix(".half1.progress").exists()


@pytest.mark.parametrize("halves", [False, True], ids=["together", "independent-halves"])
def test_interrupted_chunk_resumes_to_the_uninterrupted_result(
    tiny: dict[str, Path], counted: Callable[[int | None], _Counter], halves: bool
) -> None:
    """Killed after one batch and rerun: only the unfinished batches are refined, the result is
    the uninterrupted run's exactly, and the progress files are gone once the chunk is written."""
    progress = tiny["root"] / f"resume-{halves}.progress"
    full = counted(None)
    fresh = _run(tiny, f"fresh-{halves}.npz", independent_halves=halves)
    n_batches = full.calls
    _interrupt(tiny, counted, progress, independent_halves=halves)
    rerun = counted(None)
    resumed = _run(tiny, f"resumed-{halves}.npz", progress=progress, independent_halves=halves)
    assert rerun.calls == n_batches - 1  # the finished batch was reused
    for key in ("index", "coefficients", "angles", "shifts", "cost", "cost_prior", "flagged", "steps"):
        np.testing.assert_array_equal(resumed[key], fresh[key], err_msg=key)
    leftovers = [
        p
        for p in (progress, progress.with_suffix(".half1.progress"), progress.with_suffix(".half2.progress"))
        if p.exists()
    ]
    assert leftovers == []


@pytest.mark.parametrize("change", ["predictions", "mode", "steps", "points", "version"])
def test_progress_of_other_inputs_or_settings_is_not_reused(
    tiny: dict[str, Path],
    counted: Callable[[int | None], _Counter],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    change: str,
) -> None:
    """Partial state of a killed run, then one input, setting or the library version changes:
    every batch is refined again (with a warning) and the result is a fresh run's with the new
    ones; where the change changes the numbers, it differs from what the stale state held."""
    progress = tiny["root"] / f"stale-{change}.progress"
    _interrupt(tiny, counted, progress)
    _, stale, stale_done = Journal.load(progress)
    new: dict[str, Any] = {
        "predictions": {"prior": "prior_b"},
        "mode": {"config": dataclasses.replace(CFG, mode="free")},
        "steps": {"config": dataclasses.replace(CFG, steps=9)},
        "points": {"points": "points_b"},
        "version": {},
    }[change]
    if change == "version":
        monkeypatch.setattr(z3lib, "__version__", z3lib.__version__ + ".other")
    counted(None)
    expected = _run(tiny, f"expected-{change}.npz", **new)
    rerun = counted(None)
    with caplog.at_level(logging.WARNING, logger="z3lib.refine"):
        got = _run(tiny, f"got-{change}.npz", progress=progress, **new)
    assert rerun.calls == 3  # nothing of the old partial state was used
    assert any("not used" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(got["coefficients"], expected["coefficients"])
    np.testing.assert_array_equal(got["cost"], expected["cost"])
    if change in ("predictions", "mode", "points"):
        first = stale_done
        assert first.sum() == CFG.batch_size
        assert not np.allclose(stale["cost"][first], got["cost"][first])
    assert not progress.exists()
