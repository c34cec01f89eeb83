"""Training on several processes (issue 14): torchrun with two gloo ranks on the CPU takes the same
steps as one process on the same global batches, writes from rank 0 only, and its checkpoint
resumes in either mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from z3lib.io import read_table
from z3lib.network import load_model
from z3lib.stages.preprocess import preprocess
from z3lib.stages.simulate import simulate_dataset

ADK = Path(__file__).parent / "data" / "mdanalysistests_adk"
REPO = Path(__file__).resolve().parents[1]
# 197 particles, 10 % held out: 177 trained, so the last batch of 16 holds one particle and one
# rank's share of it is empty (it must still take part in the gradient exchange, weighted 0)
SETTINGS = {
    "seed": 5,
    "zernike": {"L1": 3, "L2": 2, "basis": "xmipp"},
    "train": {"epochs": 2, "batch_size": 16, "learning_rate": 2e-3, "encoder_box": 32, "validation_fraction": 0.1},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    sim = simulate_dataset(
        root / "sim",
        start_model=ADK / "adk_closed.pdb",
        end_model=ADK / "adk_open.pdb",
        n_particles=197,
        box=32,
        pixel_size=4.0,
        resolution=10.0,
        snr=1.0,
        seed=2,
        consensus=False,
    )
    pre = preprocess(sim["particles"], sim["reference"], sim["mask"], root / "pre", box=32)
    return {"particles": pre["particles"], "points": pre["points"], "root": root}


def _write_config(path: Path, epochs: int) -> Path:
    settings = {**SETTINGS, "train": {**SETTINGS["train"], "epochs": epochs}}
    path.write_text(yaml.safe_dump(settings))
    return path


def _train(tiny: dict[str, Path], out: Path, epochs: int, processes: int, checkpoint: Path | None = None) -> None:
    """Run the training command, as one process or as ``processes`` gloo ranks under torchrun."""
    args = [
        "-m",
        "z3lib.stages.train",
        "--particles",
        str(tiny["particles"]),
        "--points",
        str(tiny["points"]),
        "--out",
        str(out),
        "--config",
        str(_write_config(out.parent / f"{out.name}.yaml", epochs)),
        "--device",
        "cpu",
        "--threads",
        "2",
        "--log-file",
        str(out.parent / f"{out.name}.log"),
    ]
    if checkpoint is not None:
        args += ["--checkpoint-dir", str(checkpoint)]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=600)
    log = out.parent / f"{out.name}.log"
    assert result.returncode == 0, result.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")


def _assert_same_model(a: Path, b: Path) -> None:
    wa = load_model(a / "model.pt")[0].state_dict()
    wb = load_model(b / "model.pt")[0].state_dict()
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=2e-5, rtol=1e-4, msg=key)


def test_two_gloo_ranks_match_one_process(tiny: dict[str, Path], tmp_path: Path) -> None:
    _train(tiny, tmp_path / "one", epochs=2, processes=1)
    _train(tiny, tmp_path / "two", epochs=2, processes=2)
    _assert_same_model(tmp_path / "one", tmp_path / "two")
    h1, h2 = read_table(tmp_path / "one" / "history.tsv"), read_table(tmp_path / "two" / "history.tsv")
    for column in ("train_loss", "train_image", "val_image"):
        np.testing.assert_allclose(h2[column], h1[column], rtol=1e-5, err_msg=column)
    # the training actually moved the network (the comparison is not between two initialisations)
    assert float(h1["train_image"].iloc[-1]) < float(h1["train_image"].iloc[0])
    log = (tmp_path / "two.log").read_text()
    assert "rank 0 of 2" in log and "data parallel: 2 processes" in log
    # progress comes from rank 0 only
    assert "rank 1 z3.train: epoch" not in log


def test_a_checkpoint_of_two_ranks_resumes_in_one_process(tiny: dict[str, Path], tmp_path: Path) -> None:
    # one epoch on two ranks, extended to two epochs by one process, against the same in one process
    _train(tiny, tmp_path / "two", epochs=1, processes=2, checkpoint=tmp_path / "ckpt_two")
    _train(tiny, tmp_path / "resumed", epochs=2, processes=1, checkpoint=tmp_path / "ckpt_two")
    assert "resuming from" in (tmp_path / "resumed.log").read_text()
    _train(tiny, tmp_path / "one", epochs=1, processes=1, checkpoint=tmp_path / "ckpt_one")
    _train(tiny, tmp_path / "extended", epochs=2, processes=1, checkpoint=tmp_path / "ckpt_one")
    _assert_same_model(tmp_path / "extended", tmp_path / "resumed")
