"""Kill and resume, proven (issue 12): each long stage (train, refine, ZART, and a round of the
flexible refinement) is killed with SIGKILL at a random point inside it (Snakemake and its job,
the whole process group), the same command is run again, and the outputs are compared with those
of an uninterrupted run. A second test per stage changes one input or setting between the killed
run and the rerun and shows that nothing of the old partial state is used.

After a SIGKILL (a power cut, an out-of-memory kill, ``kill -9``) Snakemake leaves its lock
behind, so what a user runs, and what these tests run, is ``snakemake --unlock`` with the same
options, then the same command again (README, Resuming); ``rerun-incomplete`` (in the profiles)
restarts the job the kill interrupted, and that job resumes from its own partial state:

- train: ``rounds/<k>/train/checkpoint/checkpoint.pt``, written after every epoch;
- refine: ``rounds/<k>/refine/chunks/<i>-of-<n>.progress``, written after every batch;
- ZART has no partial state: its job starts again (its half-written outputs are removed).

All comparisons are exact (CPU, the same thread count in every run): a resumed stage computes
the same numbers as an uninterrupted one. Only what is not a result is left out: wall times in
``history.tsv``, the creation time that mrcfile writes into every MRC header's label and the
time in the first line of every STAR file.

"Random point": the test polls the stage's log until it is inside the stage (after a random
epoch of training, a random batch of the refinement, the start of ZART or of round 2), then waits
a random fraction of an epoch, a batch or the stage's measured duration, from a seeded generator
(``Z3_KILL_SEED`` to try other points), and kills. Every test asserts that the kill landed
inside the stage (its output was not complete yet).

The uninterrupted run (a module fixture, two rounds on 32 simulated particles at the smallest
settings that still have several epochs and batches) is shared by all tests; each test works on
a copy of it with the stage's results removed. Every run uses one snapshot of the workflow and
z3lib taken when the module starts, so that an edit of the checkout during the session cannot
make the runs it compares differ.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from z3lib.io import read_map, read_particles, read_table, write_particles_star

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ADK = REPO / "tests" / "data" / "mdanalysistests_adk"
RUN = "kr"
SEED = int(os.environ.get("Z3_KILL_SEED", "12"))
EPOCHS = 5
N_PARTICLES = 32
REFINE_BATCH = 8  # 4 batches
CONFIG: dict[str, Any] = {
    "run": RUN,
    "box": 24,
    "rounds": 2,
    "zernike": {"L1": 3, "L2": 2, "basis": "xmipp"},
    "train": {"epochs": EPOCHS, "batch_size": 8, "encoder_box": 24},
    # refine_shifts: round 1's refined shifts must reach round 2's network (issue 12)
    "refine": {"chunks": 1, "steps": 4, "grid_points": 5, "batch_size": REFINE_BATCH, "refine_shifts": True},
    "zart": {"iterations": 2, "batch_size": 8},
}
ROUND_STAGES = ("train", "predict", "refine", "zart")


# --- running and killing Snakemake ----------------------------------------------------------------
def snapshot_code(folder: Path) -> None:
    """Copy the workflow and z3lib into ``folder``: every run of this module uses that copy, so
    the runs it compares use the same code even while the checkout is being edited."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, folder / name)
    for name in ("workflow", "z3lib", "profiles", "envs"):
        shutil.copytree(REPO / name, folder / name, ignore=ignore)


def command(workdir: Path, target: str, config: Path) -> list[str]:
    """The user's command: the target, the CI profile (CPU) and the config, with the code
    snapshot beside ``workdir`` (:func:`snapshot_code`)."""
    code = workdir.parent / "code"
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(code / "Snakefile"),
        "--directory",
        str(workdir),
        target,
        "--workflow-profile",
        str(code / "profiles" / "ci"),
        "--configfile",
        str(config),
    ]


def run(workdir: Path, cmd: list[str], timeout: float = 300) -> str:
    result = subprocess.run(
        cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{cmd}\nexit {result.returncode}:\n{result.stdout}"
    return result.stdout


def run_and_kill(workdir: Path, cmd: list[str], inside: Callable[[], bool], wait: float, timeout: float = 240) -> None:
    """Start ``cmd`` in a new process group, poll until ``inside()`` (the stage is running), wait
    ``wait`` seconds more, then SIGKILL the whole group (Snakemake and the job it runs)."""
    with open(workdir / "killed_run.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not inside():
                log = read(workdir / "killed_run.log")
                assert proc.poll() is None, f"Snakemake ended before the kill point:\n{log}"
                assert time.monotonic() < deadline, "the stage did not start in time"
                time.sleep(0.02)
            time.sleep(wait)
            assert proc.poll() is None, f"Snakemake ended before the kill:\n{read(workdir / 'killed_run.log')}"
            os.killpg(proc.pid, signal.SIGKILL)
            print(f"{workdir.name}: killed {wait:.2f} s after the stage's marker")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def resume(workdir: Path, cmd: list[str], check_lock: bool = False) -> str:
    """What a user runs after a kill: unlock (the killed Snakemake left its lock), then the same
    command. ``check_lock``: first show that the same command alone is refused (why the README
    says to unlock). Returns the last run's output."""
    if check_lock:
        locked = subprocess.run(
            cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, check=False
        )
        assert locked.returncode != 0 and "--unlock" in locked.stdout, locked.stdout
    run(workdir, [*cmd, "--unlock"])
    return run(workdir, cmd)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def log_has(path: Path, pattern: str) -> Callable[[], bool]:
    return lambda: re.search(pattern, read(path)) is not None


def incomplete(workdir: Path, output: str) -> bool:
    """True when ``output`` (relative to ``workdir``) is missing or marked incomplete by Snakemake."""
    marker = workdir / ".snakemake" / "incomplete" / base64.b64encode(output.encode()).decode()
    return not (workdir / output).exists() or marker.exists()


def step_seconds(log: str, pattern: str) -> float:
    """Median time between consecutive log lines matching ``pattern`` (an epoch, a batch)."""
    stamps = [
        datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in log.splitlines() if re.search(pattern, line)
    ]
    assert len(stamps) >= 2, log
    return float(np.median(np.diff([s.timestamp() for s in stamps])))


def benchmark_seconds(workdir: Path, job: str) -> float:
    return float(read_table(workdir / "benchmarks" / RUN / f"{job}.tsv")["s"].iloc[0])


# --- comparing outputs ----------------------------------------------------------------------------
def assert_same_file(a: Path, b: Path) -> None:
    """The same result: MRC data and voxel size (not the header's creation time), STAR text but
    its first line (the time it was written), model weights, settings and metadata, the training
    history but its wall times, other files byte for byte."""
    if a.suffix == ".mrc":
        ma, mb = read_map(a), read_map(b)
        np.testing.assert_array_equal(ma.data, mb.data, err_msg=str(a))
        assert ma.pixel_size == mb.pixel_size, a
    elif a.suffix == ".pt":
        pa, pb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        assert pa.keys() == pb.keys() and pa["config"] == pb["config"], a
        for key in pa["state_dict"]:
            torch.testing.assert_close(pa["state_dict"][key], pb["state_dict"][key], rtol=0, atol=0, msg=key)
        assert str(pa["meta"]) == str(pb["meta"]), a
    elif a.suffix == ".star":  # but its first line, the time starfile wrote it
        ta, tb = (path.read_text().split("\n", 1) for path in (a, b))
        assert ta[0].startswith("# Written by z3lib") and tb[0].startswith("# Written by z3lib"), a
        assert ta[1] == tb[1], a
    elif a.name == "history.tsv":
        timing = ["seconds", "images_per_s"]
        ta, tb = read_table(a).drop(columns=timing), read_table(b).drop(columns=timing)
        assert ta.equals(tb), f"{a}\n{ta}\n{tb}"
    else:
        assert a.read_bytes() == b.read_bytes(), a


def results(workdir: Path, folder: str) -> dict[str, Path]:
    """The result files under results/<run>/<folder>, by relative path (partial state excluded:
    training checkpoints are compared through the model they end in)."""
    base = workdir / "results" / RUN / folder
    return {
        str(p.relative_to(base)): p
        for p in sorted(base.rglob("*"))
        if p.is_file() and "checkpoint" not in p.parts and ".progress." not in p.name
    }


def assert_same_results(workdir: Path, reference: Path, folder: str) -> None:
    mine, theirs = results(workdir, folder), results(reference, folder)
    assert mine.keys() == theirs.keys(), (sorted(mine), sorted(theirs))
    for name, path in mine.items():
        assert_same_file(path, theirs[name])


def differs(workdir: Path, reference: Path, relative: str) -> bool:
    try:
        assert_same_file(workdir / "results" / RUN / relative, reference / "results" / RUN / relative)
    except AssertionError:
        return True
    return False


# --- the uninterrupted run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Simulated particles (the user's data), and an uninterrupted two-round run up to round 2's
    ZART (no report), in ``root/clean``."""
    from z3lib.stages.simulate import simulate_dataset

    root = tmp_path_factory.mktemp("kill_resume")
    (root / "code").mkdir()
    snapshot_code(root / "code")
    sim = simulate_dataset(
        root / "data",
        start_model=ADK / "adk_closed.pdb",
        end_model=ADK / "adk_open.pdb",
        n_particles=N_PARTICLES,
        box=32,
        pixel_size=4.0,
        resolution=10.0,
        snr=1.0,
        seed=4,
    )
    config = root / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {**CONFIG, "particles": str(sim["particles"]), "reference": str(sim["reference"]), "mask": str(sim["mask"])}
        )
    )
    workdir = root / "clean"
    workdir.mkdir()
    t0 = time.perf_counter()
    run(workdir, command(workdir, f"results/{RUN}/rounds/2/zart/corrected.mrc", config), timeout=600)
    return {"root": root, "dir": workdir, "config": config, "sim": sim, "seconds": time.perf_counter() - t0}


def copy_without(clean: dict[str, Any], name: str, *remove: str) -> Path:
    """A copy of the uninterrupted run (mtimes kept, so nothing upstream reruns) without its logs
    and the folders ``remove`` (relative to results/<run>/), which the test's run makes again."""
    workdir = clean["root"] / name
    shutil.copytree(clean["dir"], workdir, symlinks=True)
    for folder in remove:
        shutil.rmtree(workdir / "results" / RUN / folder)
    shutil.rmtree(workdir / "logs")  # the tests poll the new run's logs
    shutil.rmtree(workdir / ".snakemake" / "log", ignore_errors=True)
    return workdir


def changed_config(clean: dict[str, Any], workdir: Path, section: str, key: str, value: Any) -> Path:
    config = yaml.safe_load(clean["config"].read_text())
    config[section][key] = value
    path = workdir / "changed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rng(test: str) -> np.random.Generator:
    """The seeded generator of one test's kill point."""
    return np.random.default_rng([SEED, zlib.crc32(test.encode())])


# --- train ----------------------------------------------------------------------------------------
TRAIN = f"results/{RUN}/rounds/1/train/model.pt"
TRAIN_LOG = f"logs/{RUN}/rounds/1/train.log"
CHECKPOINT = f"results/{RUN}/rounds/1/train/checkpoint/checkpoint.pt"


def kill_in_training(workdir: Path, cmd: list[str], clean: dict[str, Any], generator: np.random.Generator) -> int:
    """Kill during an epoch after a random one (1 … EPOCHS − 2) finished; returns that epoch."""
    epoch = int(generator.integers(1, EPOCHS - 1))
    per_epoch = step_seconds(read(clean["dir"] / TRAIN_LOG), r"epoch \d+ done")
    run_and_kill(
        workdir,
        cmd,
        log_has(workdir / TRAIN_LOG, rf"epoch {epoch} done"),
        float(generator.uniform(0.0, 0.9)) * per_epoch,
    )
    assert incomplete(workdir, TRAIN) and (workdir / CHECKPOINT).exists()
    return epoch


def test_train_killed_resumes_to_the_uninterrupted_model(clean: dict[str, Any]) -> None:
    workdir = copy_without(clean, "train", "rounds/1/train")
    cmd = command(workdir, TRAIN, clean["config"])
    epoch = kill_in_training(workdir, cmd, clean, rng("train"))
    resume(workdir, cmd, check_lock=True)
    resumed = re.search(r"resuming from \S+ after epoch (\d+)", read(workdir / TRAIN_LOG))
    assert resumed and epoch <= int(resumed.group(1)) < EPOCHS, read(workdir / TRAIN_LOG)
    assert_same_results(workdir, clean["dir"], "rounds/1/train")


def test_train_killed_then_particles_changed_ignores_the_checkpoint(clean: dict[str, Any]) -> None:
    """The user's particles STAR changes (other angles, same images) after the kill: training
    starts afresh (the checkpoint was made for other poses) and ends in the model a clean run on
    the new particles gives."""
    workdir = copy_without(clean, "train_changed", "preprocess", "rounds/1/train")
    star = workdir / "particles.star"
    for name in ("particles.star", "particles.mrcs"):
        shutil.copy2(Path(clean["sim"]["particles"]).parent / name, workdir / name)
    config = yaml.safe_load(clean["config"].read_text())
    config["particles"] = str(star)
    (workdir / "mine.yaml").write_text(yaml.safe_dump(config))
    cmd = command(workdir, TRAIN, workdir / "mine.yaml")
    kill_in_training(workdir, cmd, clean, rng("train_changed"))
    particles = read_particles(star)
    table = particles.table.copy()
    table["rot"] = table["rot"] + np.random.default_rng(1).normal(scale=10.0, size=len(table))
    write_particles_star(star, particles, table=table)
    resume(workdir, cmd)
    log = read(workdir / TRAIN_LOG)
    assert "it was made for other data or settings" in log and "resuming" not in log, log
    # the clean run on the new particles: same folder, no checkpoint
    fresh = clean["root"] / "train_changed_fresh"
    shutil.copytree(workdir, fresh, symlinks=True)
    shutil.rmtree(fresh / "results" / RUN / "rounds/1/train")
    run(fresh, command(fresh, TRAIN, fresh / "mine.yaml"))
    assert "ignoring" not in read(fresh / TRAIN_LOG)
    assert_same_results(workdir, fresh, "rounds/1/train")
    assert differs(workdir, clean["dir"], "rounds/1/train/model.pt")  # the change mattered


# --- refine ---------------------------------------------------------------------------------------
REFINE = f"results/{RUN}/rounds/1/refine/particles.star"
REFINE_LOG = f"logs/{RUN}/rounds/1/refine_chunk/1-of-1.log"
PROGRESS = f"results/{RUN}/rounds/1/refine/chunks/1-of-1.progress"
N_BATCHES = N_PARTICLES // REFINE_BATCH


def kill_in_refinement(workdir: Path, cmd: list[str], clean: dict[str, Any], generator: np.random.Generator) -> int:
    """Kill during a batch after a random one (1 … N_BATCHES − 1) was saved; returns that batch."""
    batch = int(generator.integers(1, N_BATCHES))
    per_batch = step_seconds(read(clean["dir"] / REFINE_LOG), r"refined \d+/")
    run_and_kill(
        workdir,
        cmd,
        log_has(workdir / REFINE_LOG, rf"refined {batch * REFINE_BATCH}/"),
        float(generator.uniform(0.0, 0.9)) * per_batch,
    )
    assert incomplete(workdir, REFINE) and (workdir / PROGRESS).exists()
    return batch


def test_refine_killed_resumes_to_the_uninterrupted_fields(clean: dict[str, Any]) -> None:
    workdir = copy_without(clean, "refine", "rounds/1/refine")
    cmd = command(workdir, REFINE, clean["config"])
    batch = kill_in_refinement(workdir, cmd, clean, rng("refine"))
    resume(workdir, cmd)
    resumed = re.search(r"resuming: (\d+)/(\d+) particles already refined", read(workdir / REFINE_LOG))
    assert resumed and batch * REFINE_BATCH <= int(resumed.group(1)) < N_PARTICLES, read(workdir / REFINE_LOG)
    assert not (workdir / PROGRESS).exists()  # spent once the chunk is written
    assert_same_results(workdir, clean["dir"], "rounds/1/refine")


def test_refine_killed_then_mode_changed_refines_afresh(clean: dict[str, Any]) -> None:
    """refine.mode changes from landscape to free after the kill: the saved batches are not
    used, and the fields are those of a clean run in free mode."""
    workdir = copy_without(clean, "refine_changed", "rounds/1/refine")
    kill_in_refinement(workdir, command(workdir, REFINE, clean["config"]), clean, rng("refine_changed"))
    changed = changed_config(clean, workdir, "refine", "mode", "free")
    resume(workdir, command(workdir, REFINE, changed))
    log = read(workdir / REFINE_LOG)
    assert "holds partial results of other inputs, settings or library version" in log, log
    assert "resuming" not in log, log
    fresh = copy_without(clean, "refine_changed_fresh", "rounds/1/refine")
    run(fresh, command(fresh, REFINE, changed))
    assert_same_results(workdir, fresh, "rounds/1/refine")
    assert differs(workdir, clean["dir"], "rounds/1/refine/coefficients.npy")


# --- ZART -----------------------------------------------------------------------------------------
ZART = f"results/{RUN}/rounds/1/zart/corrected.mrc"
ZART_LOG = f"logs/{RUN}/rounds/1/zart.log"


def kill_in_zart(workdir: Path, cmd: list[str], clean: dict[str, Any], generator: np.random.Generator) -> None:
    """Kill at a random point between the start of the ZART job's log and its measured end."""
    wait = float(generator.uniform(0.0, 0.6)) * benchmark_seconds(clean["dir"], "rounds/1/zart")
    run_and_kill(workdir, cmd, lambda: (workdir / ZART_LOG).exists(), wait)
    assert incomplete(workdir, ZART)


def test_zart_killed_reruns_to_the_uninterrupted_maps(clean: dict[str, Any]) -> None:
    """ZART keeps no partial state: the killed job runs again from the start, and whatever it had
    written is replaced."""
    workdir = copy_without(clean, "zart", "rounds/1/zart")
    cmd = command(workdir, ZART, clean["config"])
    kill_in_zart(workdir, cmd, clean, rng("zart"))
    resume(workdir, cmd)
    assert_same_results(workdir, clean["dir"], "rounds/1/zart")


def test_zart_killed_then_setting_changed_matches_a_clean_run(clean: dict[str, Any]) -> None:
    workdir = copy_without(clean, "zart_changed", "rounds/1/zart")
    kill_in_zart(workdir, command(workdir, ZART, clean["config"]), clean, rng("zart_changed"))
    changed = changed_config(clean, workdir, "zart", "relaxation", 0.3)
    resume(workdir, command(workdir, ZART, changed))
    fresh = copy_without(clean, "zart_changed_fresh", "rounds/1/zart")
    run(fresh, command(fresh, ZART, changed))
    assert_same_results(workdir, fresh, "rounds/1/zart")
    assert differs(workdir, clean["dir"], "rounds/1/zart/corrected.mrc")


# --- a round of the flexible refinement -----------------------------------------------------------
ROUND2 = f"results/{RUN}/rounds/2/zart/corrected.mrc"
ROUND2_JOBS = ["round_reference", "train", "predict", "refine_chunk/1-of-1", "refine", "zart"]


def test_round_two_killed_resumes_to_the_uninterrupted_round(clean: dict[str, Any]) -> None:
    """Killed at a random point of round 2 (its reference, training, prediction, refinement or
    ZART): the rerun finishes round 2 with the uninterrupted run's files, and round 1's files
    stay as they were."""
    workdir = copy_without(clean, "round2", "rounds/2")
    round1 = {name: p.stat().st_mtime_ns for name, p in results(workdir, "rounds/1").items()}
    cmd = command(workdir, ROUND2, clean["config"])
    generator = rng("round2")
    duration = sum(benchmark_seconds(clean["dir"], f"rounds/2/{job}") for job in ROUND2_JOBS)
    run_and_kill(
        workdir,
        cmd,
        lambda: (workdir / "logs" / RUN / "rounds/2/round_reference.log").exists(),
        float(generator.uniform(0.05, 0.8)) * duration,
    )
    assert incomplete(workdir, ROUND2)
    started = sorted(str(p.relative_to(workdir / "logs")) for p in (workdir / "logs" / RUN / "rounds/2").rglob("*.log"))
    print(f"round 2 killed with these jobs' logs started: {started}")
    resume(workdir, cmd)
    assert_same_results(workdir, clean["dir"], "rounds/2")
    assert {name: p.stat().st_mtime_ns for name, p in results(workdir, "rounds/1").items()} == round1


def test_round_two_killed_then_round_one_changed_uses_no_stale_state(clean: dict[str, Any]) -> None:
    """Killed in round 2's refinement (round 2's training checkpoint and the refinement's saved
    batches exist); then zart.field_scale changes, so round 1's corrected map, and with it round
    2's reference, change. The rerun redoes round 1's ZART and all of round 2: the finished
    checkpoint and the saved batches of the old reference are not used (the logs say so)."""
    workdir = copy_without(clean, "round2_changed", "rounds/2")
    scales = read_table(clean["dir"] / "results" / RUN / "rounds/1/zart/field_scale.tsv")
    chosen = float(scales.loc[scales["chosen"].astype(str) == "True", "scale"].iloc[0])
    changed = changed_config(clean, workdir, "zart", "field_scale", 0.0 if chosen > 0 else 1.0)
    generator = rng("round2_changed")
    batch = int(generator.integers(1, N_BATCHES))
    log2 = workdir / "logs" / RUN / "rounds/2/refine_chunk/1-of-1.log"
    per_batch = step_seconds(read(clean["dir"] / log2.relative_to(workdir)), r"refined \d+/")
    run_and_kill(
        workdir,
        command(workdir, ROUND2, clean["config"]),
        log_has(log2, rf"refined {batch * REFINE_BATCH}/"),
        float(generator.uniform(0.0, 0.9)) * per_batch,
    )
    out2 = workdir / "results" / RUN / "rounds/2"
    assert (out2 / "train/checkpoint/checkpoint.pt").exists() and (out2 / "refine/chunks/1-of-1.progress").exists()
    old_reference = read_map(out2 / "reference/reference.mrc").data
    resume(workdir, command(workdir, ROUND2, changed))
    assert differs(workdir, clean["dir"], "rounds/1/zart/corrected.mrc")
    new_reference = read_map(out2 / "reference/reference.mrc").data
    corrected = read_map(workdir / "results" / RUN / "rounds/1/zart/corrected.mrc").data
    np.testing.assert_array_equal(new_reference, corrected)
    assert not np.array_equal(new_reference, old_reference)
    train_log = read(workdir / "logs" / RUN / "rounds/2/train.log")
    assert "it was made for other data or settings" in train_log and "resuming" not in train_log, train_log
    assert len(read_table(out2 / "train/history.tsv")) == EPOCHS
    refine_log = read(log2)
    assert "holds partial results of other inputs" in refine_log and "resuming" not in refine_log, refine_log
    for stage in ROUND_STAGES:
        assert results(workdir, f"rounds/2/{stage}"), stage


# --- issue 12: round 2's network gets round 1's refined poses (on the uninterrupted run) ----------
def test_round_two_network_reads_round_one_refined_poses(clean: dict[str, Any]) -> None:
    """With refine.refine_shifts, round 1's refined shifts differ from the particles as given;
    round 2's training and prediction read them (their logs name round 1's refine STAR), and the
    predict STAR carries them to round 2's refinement."""
    out = clean["dir"] / "results" / RUN
    given = read_particles(clean["sim"]["particles"]).table
    refined1 = read_particles(out / "rounds/1/refine/particles.star").table
    predicted2 = read_particles(out / "rounds/2/predict/particles.star").table
    shifts = ["shift_x", "shift_y"]
    assert np.abs(refined1[shifts].to_numpy() - given[shifts].to_numpy()).max() > 0.01
    np.testing.assert_allclose(predicted2[shifts].to_numpy(), refined1[shifts].to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        predicted2[["rot", "tilt", "psi"]].to_numpy(), refined1[["rot", "tilt", "psi"]].to_numpy(), rtol=0, atol=1e-9
    )
    for job in ("train", "predict"):
        log = read(clean["dir"] / "logs" / RUN / f"rounds/2/{job}.log")
        assert f"poses and CTF of the {N_PARTICLES} particles from results/{RUN}/rounds/1/refine/particles.star" in log
    for job in ("train", "predict"):
        assert "rounds/1/refine" not in read(clean["dir"] / "logs" / RUN / f"rounds/1/{job}.log")
