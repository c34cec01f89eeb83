"""Workflow tests: the Snakemake CLI (dry runs, lint, format, config errors) and tiny CPU runs.

Every run uses the repository's Snakefile on a temporary working directory
(``snakemake -s <repo>/Snakefile --directory <tmp>``), so nothing is written into the repository.
Scenario configs are ``tests/workflow/config_*.yaml``; their paths are relative to the repository
root and made absolute here, because relative config paths resolve against the working directory.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from z3lib.io import read_particles

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SNAKEFILE = REPO / "Snakefile"
CI_PROFILE = REPO / "profiles" / "ci"

# Config keys holding paths, as (section, key); section None is the top level.
PATH_KEYS = [
    (None, "particles"),
    (None, "reference"),
    (None, "mask"),
    (None, "image_root"),
    ("demo", "start_model"),
    ("demo", "end_model"),
    (None, "model"),
]

PREPROCESS_OUTPUTS = ["particles.star", "particles.mrcs", "reference.mrc", "mask.mrc", "points.npz"]
TRAIN_OUTPUTS = ["model.pt", "history.tsv"]
PREDICT_OUTPUTS = ["particles.star", "coefficients.npy"]
REFINE_OUTPUTS = ["particles.star", "coefficients.npy"]
ZART_OUTPUTS = ["corrected.mrc", "corrected_half1.mrc", "corrected_half2.mrc", "uncorrected.mrc", "fsc.tsv"]
REPORT_OUTPUTS = [
    "report.html",
    "landscape.tsv",
    "landscape_pca.png",
    "landscape_pca.svg",
    "landscape_umap.png",
    "landscape_umap.svg",
    "motions.png",
    "deformation.png",
    "fsc.png",
    "fsc.svg",
    "slices.png",
    "particles.xmd",
    "mean_deformation.mrc",
    "motion/motion_pc1.cxc",
    "motion/motion_pc2.cxc",
    "clusters/clusters.cxc",
    "rounds.tsv",
]
SIMULATE_OUTPUTS = [
    "particles.star",
    "particles.mrcs",
    "ground_truth.tsv",
    "motion.npz",
    "reference.mrc",
    "mask.mrc",
    "truth_reference.mrc",
    "state_start.mrc",
    "state_end.mrc",
]


def snakemake(workdir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the Snakemake CLI on the repository's Snakefile in ``workdir``; stdout+stderr merged."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir)]
    return subprocess.run(
        [*cmd, *args],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


def scenario_config(name: str, workdir: Path) -> Path:
    """Copy ``tests/workflow/config_<name>.yaml`` into ``workdir`` with absolute paths."""
    config: dict[str, Any] = yaml.safe_load((HERE / f"config_{name}.yaml").read_text()) or {}
    for section, key in PATH_KEYS:
        holder = config.get(section, {}) if section else config
        value = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute():
            holder[key] = str(REPO / value)
    path = workdir / f"config_{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints before running (or dry-running): rule -> jobs."""
    match = re.search(r"Job stats:\n(.*?)\n\s*total\s+\d+", output, flags=re.DOTALL)
    assert match, f"no job stats in the output:\n{output}"
    rows = (re.match(r"^(\w+)\s+(\d+)\s*$", line) for line in match.group(1).splitlines())
    return {row.group(1): int(row.group(2)) for row in rows if row}


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}\nexit {result.returncode}:\n{result.stdout}"


@pytest.fixture
def demo_dir(tmp_path: Path) -> Path:
    """A working directory like a fresh clone's root: the default config.yaml and resources/demo."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    shutil.copytree(REPO / "resources" / "demo", tmp_path / "resources" / "demo")
    return tmp_path


# --- plans ------------------------------------------------------------------------------------------
def test_dry_run_default_config_plans_the_demo(demo_dir: Path) -> None:
    result = snakemake(demo_dir, "-n")
    assert_ok(result)
    assert job_counts(result.stdout) == {
        "simulate": 1,
        "preprocess": 1,
        "train": 1,
        "predict": 1,
        "refine_landscape": 1,
        "refine_chunk": 2,
        "refine": 1,
        "zart": 1,
        "publish": 1,
        "report": 1,
        "all": 1,
    }
    for name in PREPROCESS_OUTPUTS:
        assert f"results/demo/preprocess/{name}" in result.stdout
    assert "logs/demo/simulate.log" in result.stdout
    assert "benchmarks/demo/preprocess.tsv" in result.stdout


def test_dry_run_user_config_plans_preprocess_only(tmp_path: Path) -> None:
    result = snakemake(tmp_path, "-n", "--configfile", str(scenario_config("user", tmp_path)))
    assert_ok(result)
    assert job_counts(result.stdout) == {
        "preprocess": 1,
        "train": 1,
        "predict": 1,
        "refine_landscape": 1,
        "refine_chunk": 2,
        "refine": 1,
        "zart": 1,
        "publish": 1,
        "report": 1,
        "all": 1,
    }
    assert "rule simulate" not in result.stdout
    assert str(REPO / "tests/data/cryodrgn/relion31.star") in result.stdout
    assert "results/user/preprocess/points.npz" in result.stdout


def planned_jobs(output: str) -> list[dict[str, str]]:
    """Each job of a dry run: its rule and the lines of its block (input, output, wildcards)."""
    jobs = []
    for block in re.split(r"\n\n+", output):
        rule = re.search(r"^(?:localrule|rule) (\w+):", block, flags=re.MULTILINE)
        if rule:
            fields = dict(re.findall(r"^ {4}(\w+): (.*)$", block, flags=re.MULTILINE))
            jobs.append({"rule": rule.group(1), **fields})
    return jobs


ROUND_JOBS = {"train": 1, "predict": 1, "refine_landscape": 1, "refine_chunk": 2, "refine": 1, "zart": 1}


@pytest.mark.parametrize("rounds", [1, 2, 3])
@pytest.mark.parametrize("mode", ["shared", "independent"])
def test_dry_run_plans_every_round_and_mode(demo_dir: Path, rounds: int, mode: str) -> None:
    """`rounds` and `gold_standard` from the command line: one set of round jobs per round, each
    round k >= 2 fed by round k-1 (its corrected map, or in independent mode each half's own map
    and network), and the final round published to the stage paths."""
    result = snakemake(demo_dir, "-n", "--config", f"rounds={rounds}", f"gold_standard={mode}")
    assert_ok(result)
    expected = {"simulate": 1, "preprocess": 1, "publish": 1, "report": 1, "all": 1}
    for rule, count in ROUND_JOBS.items():
        if rule == "train" and mode == "independent":
            expected["train_half"] = 2 * rounds
        else:
            expected[rule] = count * rounds
    if rounds > 1:
        expected["round_reference"] = rounds - 1 if mode == "shared" else 1  # independent: the report's only
        if mode == "independent":
            expected["round_reference_half"] = 2 * (rounds - 1)
    assert job_counts(result.stdout) == expected
    jobs = planned_jobs(result.stdout)
    run = "results/demo"
    for k in range(2, rounds + 1):
        if mode == "shared":
            (ref,) = [j for j in jobs if j["rule"] == "round_reference" and f"rounds/{k}/" in j["output"]]
            assert f"{run}/rounds/{k - 1}/zart/corrected.mrc" in ref["input"]
            (tr,) = [j for j in jobs if j["rule"] == "train" and f"rounds/{k}/" in j["output"]]
            assert f"{run}/rounds/{k - 1}/train/model.pt" in tr["input"]
            assert f"{run}/rounds/{k}/reference/points.npz" in tr["input"]
        else:
            for h in (1, 2):
                (ref,) = [
                    j
                    for j in jobs
                    if j["rule"] == "round_reference_half" and f"rounds/{k}/reference/half{h}/" in j["output"]
                ]
                assert ref["input"].split(", ")[0] == f"{run}/rounds/{k - 1}/zart/corrected_half{h}.mrc"
                (tr,) = [j for j in jobs if j["rule"] == "train_half" and f"rounds/{k}/train/half{h}/" in j["output"]]
                assert f"{run}/rounds/{k - 1}/train/half{h}/model.pt" in tr["input"]
                assert f"{run}/rounds/{k}/reference/half{h}/points.npz" in tr["input"]
                assert f"half{3 - h}" not in tr["input"]
            (zj,) = [j for j in jobs if j["rule"] == "zart" and f"rounds/{k}/" in j["output"]]
            assert all(f"{run}/rounds/{k}/reference/half{h}/points.npz" in zj["input"] for h in (1, 2))
    for k in range(1, rounds + 1):  # every stage reads the latest poses and CTF (issue 12, item 3)
        (zj,) = [j for j in jobs if j["rule"] == "zart" and f"rounds/{k}/" in j["output"]]
        assert f"{run}/rounds/{k}/refine/particles.star" in zj["input"].split(", ")
        chunks = [j for j in jobs if j["rule"] == "refine_chunk" and f"rounds/{k}/" in j["output"]]
        assert chunks and all(f"{run}/rounds/{k}/predict/particles.star" in j["input"].split(", ") for j in chunks)
        # the chunks start from the population's landscape of their round (one per half set)
        names = ["landscape_half1.npz", "landscape_half2.npz"] if mode == "independent" else ["landscape.npz"]
        (land,) = [j for j in jobs if j["rule"] == "refine_landscape" and f"rounds/{k}/" in j["output"]]
        assert sorted(land["output"].split(", ")) == [f"{run}/rounds/{k}/refine/{name}" for name in names]
        assert all(f"{run}/rounds/{k}/refine/{name}" in j["input"].split(", ") for j in chunks for name in names)
        # the network of round k >= 2 trains and predicts with round k-1's refined poses
        network = [j for j in jobs if j["rule"] in ("train", "train_half", "predict") and f"rounds/{k}/" in j["output"]]
        assert len(network) == (3 if mode == "independent" else 2)
        for job in network:
            refined = [path for path in job["input"].split(", ") if path.endswith("/refine/particles.star")]
            assert refined == ([f"{run}/rounds/{k - 1}/refine/particles.star"] if k > 1 else []), job
    (pub,) = [j for j in jobs if j["rule"] == "publish"]
    assert f"{run}/rounds/{rounds}/zart/corrected.mrc" in pub["input"]
    assert f"{run}/zart/corrected.mrc" in pub["output"] and f"{run}/refine/coefficients.npy" in pub["output"]
    assert all(f"rounds/{k}/" not in pub["input"] for k in range(1, rounds))


# --- static checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [(), ("rounds=3", "gold_standard=independent")])
def test_lint_is_clean(demo_dir: Path, overrides: tuple[str, ...]) -> None:
    result = snakemake(demo_dir, "--lint", *(("--config", *overrides) if overrides else ()))
    assert_ok(result)
    assert "Lints for" not in result.stdout
    assert "Congratulations, your workflow is in a good condition!" in result.stdout


def test_snakefmt_check() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/rules"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    assert_ok(result)


def test_slurm_profile_sets_per_rule_resources(demo_dir: Path) -> None:
    # CI has no conda, so the profile's `software-deployment-method: conda` is overridden here.
    slurm = str(REPO / "profiles" / "slurm")
    result = snakemake(demo_dir, "-n", "--workflow-profile", slurm, "--sdm", "env-modules")
    assert_ok(result)
    assert "Using workflow specific profile" in result.stdout
    resources = dict(re.findall(r"rule (\w+):\n(?: {4}.*\n)*? {4}resources: (.*)", result.stdout))
    assert {"mem_mb=8000", "runtime=30"} <= set(resources["simulate"].split(", "))
    assert {"mem_mb=16000", "runtime=120"} <= set(resources["preprocess"].split(", "))


def test_slurm_profile_gives_distributed_training_its_gpus_in_one_task(demo_dir: Path) -> None:
    """train.processes 2: the train job asks for 2 GPUs, 8 cores per GPU, and is ONE Slurm task
    (sbatch as the executor plugin builds it: no --ntasks-per-gpu, which would split the job)."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    slurm = str(REPO / "profiles" / "slurm")
    config = demo_dir / "two_processes.yaml"
    config.write_text("train:\n  processes: 2\n")
    result = snakemake(demo_dir, "-n", "--workflow-profile", slurm, "--sdm", "env-modules", "--configfile", str(config))
    assert_ok(result)
    resources = dict(re.findall(r"rule (\w+):\n(?: {4}.*\n)*? {4}resources: (.*)", result.stdout))
    train = dict(item.split("=", 1) for item in resources["train"].split(", "))
    assert (train["gpu"], train["cpus_per_gpu"], train["tasks_per_gpu"]) == ("2", "8", "0")

    class Resources(dict):  # what the plugin reads: job.resources.get(...) and job.resources.name
        __getattr__ = dict.get

    values = {k: int(v) if v.isdigit() else v for k, v in train.items()}
    job = SimpleNamespace(resources=Resources(values), threads=8, is_group=lambda: False, name="train")
    params = {
        "run_uuid": "x",
        "slurm_logfile": "log",
        "comment_str": "c",
        "account": "",
        "partition": "",
        "workdir": "",
    }
    call = get_submit_command(job, params)
    assert "--cpus-per-gpu=8" in call and "--ntasks-per-gpu" not in call and "--ntasks=" not in call, call
    assert set_gres_string(job).strip() == "--gpus=2"


# --- config errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("bad_key", "Unknown config key 'zernikee'"),
        ("bad_nested_key", "Unknown config key 'zernike.L3'"),
        ("no_reference", "Config key 'reference' is required when 'particles' is set"),
        ("missing_file", "Config key 'particles': file not found"),
        ("missing_model", "Config key 'model': file not found"),
        ("atoms_no_model", "Config key 'zernike.points' is 'atoms' but 'model' is null"),
        ("old_report_model", "Config key 'report.model' moved to the top level"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(tmp_path: Path, scenario: str, expected: str) -> None:
    result = snakemake(tmp_path, "-n", "--configfile", str(scenario_config(scenario, tmp_path)))
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.e2e
def test_bad_input_file_ends_in_one_message_with_the_traceback_in_the_log(tmp_path: Path) -> None:
    """A STAR without rlnAngleTilt (a user's mistake, not a bug): the terminal shows the message
    naming the file and the column and where the log is, not a Python traceback; the log keeps
    the traceback; nothing of the stage is written."""
    import starfile

    source = REPO / "tests/data/cryodrgn/toy_projections_poses.star"
    star = tmp_path / "notilt.star"
    starfile.write(starfile.read(source).drop(columns="rlnAngleTilt"), star)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": "bad",
                "particles": str(star),
                "image_root": str(source.parent),
                "pixel_size": 1.0,
                "box": 30,
                "reference": str(REPO / "tests/data/cryodrgn/toymodel_small_nocenter.mrc"),
            }
        )
    )
    result = snakemake(
        tmp_path, "--workflow-profile", str(CI_PROFILE), "--configfile", str(config), "--until", "preprocess"
    )
    assert result.returncode != 0
    message = re.search(r"z3 preprocess: (.*)", result.stdout)
    assert message, result.stdout
    assert "notilt.star" in message.group(1) and "rlnAngleTilt" in message.group(1), message.group(1)
    assert "rlnAngleRot" in message.group(1)  # the columns present are named too
    assert "Traceback" not in result.stdout, result.stdout
    log = tmp_path / "logs" / "bad" / "preprocess.log"
    assert str(log) in result.stdout
    assert "Traceback" in log.read_text() and "Z3InputError" in log.read_text()
    assert not any((tmp_path / "results" / "bad" / "preprocess").glob("*.star"))


def schema_defaults(schema: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Check that every object level is closed and every key described; return the defaults."""
    assert schema.get("additionalProperties") is False, f"{where or 'top level'} is open"
    defaults = {}
    for key, sub in schema["properties"].items():
        name = f"{where}.{key}" if where else key
        assert sub.get("description"), f"{name} has no description"
        assert "default" in sub, f"{name} has no default"
        if sub.get("type") == "object":
            assert schema_defaults(sub, name) == sub["default"], f"{name}: default vs sub-keys"
        defaults[key] = sub["default"]
    return defaults


def test_schema_describes_every_key_and_config_yaml_holds_the_defaults() -> None:
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    defaults = schema_defaults(schema)
    assert yaml.safe_load((REPO / "config.yaml").read_text()) == defaults


# --- environments -----------------------------------------------------------------------------------
# PyPI name -> conda-forge name (matplotlib-base: matplotlib without the GUI toolkits)
CONDA_NAMES = {"torch": "pytorch", "cupy-cuda12x": "cupy", "matplotlib": "matplotlib-base"}


def conda_specs(env_file: Path) -> dict[str, SpecifierSet]:
    """Conda dependencies of an environment file: name -> version specifier."""
    env = yaml.safe_load(env_file.read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"], env_file
    specs = {}
    for dep in env["dependencies"]:
        assert isinstance(dep, str), f"{env_file}: unexpected entry {dep!r}"
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*([<>=!~].*)?", dep.strip())
        assert match, f"{env_file}: cannot parse {dep!r}"
        specs[match.group(1)] = SpecifierSet(match.group(2) or "")
    return specs


def test_envs_match_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(text) for text in project["dependencies"]]
    gpu = [Requirement(text) for text in project["optional-dependencies"]["gpu"]]
    envs = {path.stem: conda_specs(path) for path in sorted((REPO / "envs").glob("*.yaml"))}
    assert {"base", "torch", "cupy"} <= set(envs)
    for name, specs in envs.items():
        assert specs.get("python") == SpecifierSet(project["requires-python"]), name
        for req in runtime + (gpu if name == "cupy" else []):
            conda_name = CONDA_NAMES.get(req.name, req.name)
            assert conda_name in specs, f"envs/{name}.yaml lacks {conda_name} ({req})"
            assert specs[conda_name] == req.specifier, f"envs/{name}.yaml: {conda_name} vs {req}"


# --- tiny end-to-end runs (CPU, a few seconds each) -------------------------------------------------
@pytest.mark.e2e
def test_tiny_end_to_end_run(tmp_path: Path) -> None:
    config = scenario_config("tiny", tmp_path)
    result = snakemake(tmp_path, "--workflow-profile", str(CI_PROFILE), "--configfile", str(config))
    assert_ok(result)
    assert job_counts(result.stdout) == {
        "simulate": 1,
        "preprocess": 1,
        "train": 1,
        "predict": 1,
        "refine_landscape": 1,
        "refine_chunk": 2,
        "refine": 1,
        "zart": 1,
        "publish": 1,
        "report": 1,
        "all": 1,
    }
    for stage, names in (
        ("simulate", SIMULATE_OUTPUTS),
        ("preprocess", PREPROCESS_OUTPUTS),
        ("train", TRAIN_OUTPUTS),
        ("predict", PREDICT_OUTPUTS),
        ("refine", REFINE_OUTPUTS),
        ("zart", ZART_OUTPUTS),
        ("report", REPORT_OUTPUTS),
    ):
        for name in names:
            path = tmp_path / "results" / "tiny" / stage / name
            assert path.is_file() and path.stat().st_size > 0, path
        job = f"rounds/1/{stage}" if stage in ("train", "predict", "refine", "zart") else stage  # one round
        assert (tmp_path / "benchmarks" / "tiny" / f"{job}.tsv").is_file()
        log = (tmp_path / "logs" / "tiny" / f"{job}.log").read_text()
        assert "wall time" in log, log
    # The report's series and subsets: 5 maps and (the demo's) models per motion, 3 cluster STARs
    # that the project's reader takes back with every column of the refine STAR.
    report_dir = tmp_path / "results" / "tiny" / "report"
    for pc in (1, 2):
        assert len(list((report_dir / "motion").glob(f"motion_pc{pc}_*.mrc"))) == 5
        assert len(list((report_dir / "motion").glob(f"motion_pc{pc}_*.pdb"))) == 5
    refine_star = read_particles(tmp_path / "results" / "tiny" / "refine" / "particles.star")
    stars = sorted((report_dir / "clusters").glob("cluster_*.star"))
    assert [p.name for p in stars] == ["cluster_01.star", "cluster_02.star", "cluster_03.star"]
    subsets = [read_particles(p) for p in stars]
    assert sum(len(sub) for sub in subsets) == len(refine_star) == 60
    assert all(list(sub.raw.columns) == list(refine_star.raw.columns) for sub in subsets)
    page = (report_dir / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 6
    # Nothing left to do afterwards.
    again = snakemake(tmp_path, "-n", "--workflow-profile", str(CI_PROFILE), "--configfile", str(config))
    assert_ok(again)
    assert "Nothing to be done" in again.stdout
    # The Snakemake report builds, with the report stage's figures.
    report = snakemake(tmp_path, "--configfile", str(config), "--report", "report.html")
    assert_ok(report)
    assert (tmp_path / "report.html").stat().st_size > 0
    assert "landscape_pca.png" in (tmp_path / "report.html").read_text(errors="replace")


@pytest.mark.e2e
def test_tiny_run_with_atoms_as_the_decoders_points(tmp_path: Path) -> None:
    """zernike.points atoms with the bond and clash regularisers on the tiny demo: the demo's model becomes
    the cloud that training and refinement move (its Gaussians fitted to the reference), ZART keeps
    the voxels, and the report measures the deformed models' geometry."""
    import numpy as np

    from z3lib.io import read_npz
    from z3lib.network import load_model

    config = scenario_config("tiny", tmp_path)
    values = yaml.safe_load(config.read_text())
    values["zernike"] = {"points": "atoms"}
    values["train"]["bond_weight"] = 1.0
    values["train"]["clash_weight"] = 1.0
    config.write_text(yaml.safe_dump(values))
    result = snakemake(tmp_path, "--workflow-profile", str(CI_PROFILE), "--configfile", str(config), timeout=600)
    assert_ok(result)
    out = tmp_path / "results" / "tiny"
    atoms, voxels = read_npz(out / "preprocess" / "atoms.npz"), read_npz(out / "preprocess" / "points.npz")
    assert str(atoms["kind"]) == "atoms" and float(atoms["blur_px"]) > 0 and len(atoms["pairs"]) > 1000
    model, _ = load_model(out / "train" / "model.pt")
    assert model.decoder.points.shape[0] == len(atoms["points"]) != len(voxels["points"])
    assert float(model.decoder.blur) == pytest.approx(float(atoms["blur_px"]))
    assert len(read_npz(out / "train" / "points.npz")["points"]) == len(atoms["points"])
    history = (out / "train" / "history.tsv").read_text()
    assert "bonds" in history and "clashes" in history
    assert len(atoms["contacts"]) > 1000
    geometry = pd.read_csv(out / "report" / "model_geometry.tsv", sep="\t")
    assert len(geometry) == 3 + 2 * 5  # the cluster models and the two motion series
    assert np.isfinite(geometry["bond_rmsd_A"]).all()
    assert (out / "zart" / "corrected.mrc").is_file()


def default_terms() -> int:
    """3K, the number of coefficients per particle at the pipeline's default degrees."""
    from z3lib import zernike as zk

    degrees = yaml.safe_load((REPO / "config.yaml").read_text())["zernike"]
    return 3 * zk.count_terms(degrees["L1"], degrees["L2"])


@pytest.mark.e2e
def test_rigid_real_toy_set_end_to_end_finds_no_motion(tmp_path: Path) -> None:
    """The whole pipeline on a rigid third-party dataset (noise-free projections with exact poses
    of a known map): the fields stay near zero, and ZART returns that map, corrected or not."""
    import numpy as np

    from z3lib import zernike as zk
    from z3lib.analysis import fourier_shell_correlation, fsc_area
    from z3lib.io import read_coefficients, read_map, read_npz, read_table

    result = snakemake(
        tmp_path,
        "--workflow-profile",
        str(CI_PROFILE),
        "--configfile",
        str(scenario_config("toy", tmp_path)),
        timeout=900,
    )
    assert_ok(result)
    assert job_counts(result.stdout) == {
        "preprocess": 1,
        "train": 1,
        "predict": 1,
        "refine_landscape": 1,
        "refine_chunk": 1,
        "refine": 1,
        "zart": 1,
        "publish": 1,
        "report": 1,
        "all": 1,
    }
    out = tmp_path / "results" / "toy"
    cloud = read_npz(out / "preprocess" / "points.npz")
    degrees = yaml.safe_load((REPO / "config.yaml").read_text())["zernike"]  # the defaults it ran with
    z = zk.evaluate_basis(
        np.asarray(cloud["points"], dtype=np.float64), degrees["L1"], degrees["L2"], 15.0, degrees["basis"]
    )
    for stage in ("predict", "refine"):
        c = read_coefficients(out / stage / "coefficients.npy")
        field = np.einsum("nk,bak->bna", z, c.reshape(len(c), 3, -1))
        rms = float(np.sqrt((field**2).sum(-1).mean()))
        assert rms < 0.1, f"{stage}: {rms:.3f} px RMS deformation on a rigid dataset"  # measured 0.03 px
    assert float(read_table(out / "report" / "landscape.tsv")["deformation_rms_A"].median()) < 0.1
    truth = read_map(REPO / "tests/data/cryodrgn/toymodel_small_nocenter.mrc").data
    areas = {}
    for name in ("corrected", "uncorrected"):
        halves = [read_map(out / "zart" / f"{name}_half{h}.mrc").data for h in (1, 2)]
        average = 0.5 * (halves[0] + halves[1])
        areas[name] = fsc_area(fourier_shell_correlation(average, truth, 1.0))
        assert np.corrcoef(average.ravel(), truth.ravel())[0, 1] > 0.95, name  # measured 0.977
    assert areas["corrected"] > 0.95, areas  # measured 0.99 (0.45 before flat backgrounds kept their scale)
    assert abs(areas["corrected"] - areas["uncorrected"]) < 0.01, areas


@pytest.mark.e2e
def test_real_particles_with_two_optics_groups_end_to_end(tmp_path: Path) -> None:
    """Real noisy 200 px particles (RELION 3.1, two optics groups at 300 and 200 kV) through every
    stage at a 64 px processing box: the user's columns, optics groups and voltages survive into
    the refined STAR, and the maps carry the processing pixel size."""
    import numpy as np

    from z3lib.io import parse_coefficient_column, read_map, read_model, write_map
    from z3lib.simulate import atom_weights, density_from_atoms, gaussian_sigma

    model = read_model(REPO / "resources/demo/adk_closed.pdb")
    xyz = model.coords - model.coords.mean(0)
    reference = tmp_path / "adk_200.mrc"  # header 1.338 Å/px: the config's reference_pixel_size overrides it
    write_map(
        reference, density_from_atoms(xyz / 1.4, atom_weights(model.elements), 200, gaussian_sigma(8.0) / 1.4), 1.338
    )
    config_path = scenario_config("aspire", tmp_path)
    config = yaml.safe_load(config_path.read_text())
    config["reference"] = str(reference)
    config_path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--workflow-profile", str(CI_PROFILE), "--configfile", str(config_path), timeout=300)
    assert_ok(result)
    out = tmp_path / "results" / "aspire"
    source = read_particles(REPO / "tests/data/aspire/sample_particles_relion31.star")
    refined = read_particles(out / "refine" / "particles.star")
    assert len(refined) == 17
    assert set(source.raw.columns) < set(refined.raw.columns)
    coefficients = parse_coefficient_column(refined.raw["zernikeCoefficients"])
    assert coefficients.shape == (17, default_terms()) and np.isfinite(coefficients).all()
    np.testing.assert_array_equal(refined.table["voltage"], source.table["voltage"])
    assert sorted(set(refined.table["voltage"])) == [200.0, 300.0]
    np.testing.assert_allclose(refined.table[["rot", "tilt", "psi"]], source.table[["rot", "tilt", "psi"]])
    for name in ("corrected", "uncorrected"):
        m = read_map(out / "zart" / f"{name}.mrc")
        assert m.data.shape == (64, 64, 64) and m.pixel_size == pytest.approx(1.4 * 200 / 64)
        assert np.isfinite(m.data).all()
    assert (out / "report" / "report.html").stat().st_size > 0
    assert (out / "report" / "landscape.html").stat().st_size > 0
    # particles chosen from the landscape (a selection file as the page saves it, and a cluster):
    # only rule select runs, and its STAR keeps every column of the refined STAR for those rows
    selection = tmp_path / "selection.txt"
    selection.write_text("# saved from landscape.html\n16\n0\n3\n")
    config["select"] = {"file": str(selection), "clusters": [1, 2, 3]}
    config_path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--workflow-profile", str(CI_PROFILE), "--configfile", str(config_path), timeout=300)
    assert_ok(result)
    assert job_counts(result.stdout) == {"select": 1, "all": 1}
    chosen = read_particles(out / "select" / "particles.star")
    assert list(chosen.raw.columns) == list(refined.raw.columns)
    assert chosen.raw.equals(refined.raw.iloc[[0, 3, 16]].reset_index(drop=True))
    exported = read_particles(out / "select" / "particles.cs").table
    np.testing.assert_allclose(
        exported[["rot", "tilt", "psi"]], source.table.iloc[[0, 3, 16]][["rot", "tilt", "psi"]], atol=1e-3
    )
    np.testing.assert_array_equal(exported["voltage"], source.table["voltage"].iloc[[0, 3, 16]])


@pytest.mark.e2e
def test_interrupted_run_resumes_without_redoing_finished_stages(tmp_path: Path) -> None:
    config = str(scenario_config("tiny", tmp_path))
    profile = ("--workflow-profile", str(CI_PROFILE), "--configfile", config)
    first = snakemake(tmp_path, *profile, "--until", "simulate")
    assert_ok(first)
    assert job_counts(first.stdout) == {"simulate": 1}
    simulated = tmp_path / "results" / "tiny" / "simulate"
    mtimes = {name: (simulated / name).stat().st_mtime_ns for name in SIMULATE_OUTPUTS}
    assert not (tmp_path / "results" / "tiny" / "preprocess").exists()

    second = snakemake(tmp_path, *profile)
    assert_ok(second)
    assert job_counts(second.stdout) == {
        "preprocess": 1,
        "train": 1,
        "predict": 1,
        "refine_landscape": 1,
        "refine_chunk": 2,
        "refine": 1,
        "zart": 1,
        "publish": 1,
        "report": 1,
        "all": 1,
    }
    assert {name: (simulated / name).stat().st_mtime_ns for name in SIMULATE_OUTPUTS} == mtimes
    for name in PREPROCESS_OUTPUTS:
        assert (tmp_path / "results" / "tiny" / "preprocess" / name).is_file()


# --- refinement rounds and independent half sets (tiny CPU runs) ------------------------------------
ROUND_FILES = {
    "train": TRAIN_OUTPUTS,
    "predict": PREDICT_OUTPUTS,
    "refine": REFINE_OUTPUTS,
    "zart": [*ZART_OUTPUTS, "uncorrected_half1.mrc", "uncorrected_half2.mrc"],
}


def tiny_config(workdir: Path, **changes: Any) -> str:
    """The tiny scenario with some top-level keys changed."""
    path = scenario_config("tiny", workdir)
    config = yaml.safe_load(path.read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.e2e
def test_two_rounds_resume_per_round_and_publish_the_final_one(tmp_path: Path) -> None:
    """rounds: 2 — interrupted after round 1's ZART, the rerun does only round 2 (round 1's files
    untouched); round 2's reference is round 1's corrected map, and the stage paths hold round 2."""
    import numpy as np

    from z3lib.io import read_map, read_table

    profile = ("--workflow-profile", str(CI_PROFILE), "--configfile", tiny_config(tmp_path, rounds=2))
    out = tmp_path / "results" / "tiny"
    first = snakemake(tmp_path, *profile, "--until", "results/tiny/rounds/1/zart/corrected.mrc")
    assert_ok(first)
    assert job_counts(first.stdout) == {"simulate": 1, "preprocess": 1, **ROUND_JOBS}
    assert not (out / "rounds" / "2").exists() and not (out / "zart").exists()
    round1 = mtimes(out / "rounds" / "1")
    assert {f"{stage}/{name}" for stage, names in ROUND_FILES.items() for name in names} <= set(round1)

    second = snakemake(tmp_path, *profile, timeout=300)
    assert_ok(second)
    assert job_counts(second.stdout) == {"round_reference": 1, **ROUND_JOBS, "publish": 1, "report": 1, "all": 1}
    after = mtimes(out / "rounds" / "1")
    assert {name: after[name] for name in round1} == round1
    # Round 2 works against round 1's corrected map, with a mask and point cloud made from it.
    np.testing.assert_array_equal(
        read_map(out / "rounds/2/reference/reference.mrc").data, read_map(out / "rounds/1/zart/corrected.mrc").data
    )
    assert (
        "starting from the weights of results/tiny/rounds/1/train/model.pt"
        in (tmp_path / "logs/tiny/rounds/2/train.log").read_text()
    )
    # The stage paths are copies of round 2's files.
    for stage, names in ROUND_FILES.items():
        for name in names:
            published = (out / stage / name).read_bytes()
            assert published == (out / "rounds" / "2" / stage / name).read_bytes(), f"{stage}/{name}"
    assert (out / "refine/coefficients.npy").read_bytes() != (out / "rounds/1/refine/coefficients.npy").read_bytes()
    # The report: one row per round, with both rounds' wall times, and the per-round landscapes.
    rounds = read_table(out / "report" / "rounds.tsv")
    assert list(rounds["round"]) == [1, 2]
    assert np.isfinite(rounds.drop(columns="round").to_numpy(dtype=float)).all()
    page = (out / "report" / "report.html").read_text()
    assert "Refinement rounds" in page and "shared: one network" in page
    assert page.count('<img src="data:image/png;base64,') == 7
    again = snakemake(tmp_path, "-n", *profile)
    assert_ok(again)
    assert "Nothing to be done" in again.stdout


@pytest.mark.e2e
def test_independent_half_sets_end_to_end(tmp_path: Path) -> None:
    """gold_standard: independent over two rounds — each half's network records exactly ZART's
    half-set rows, round 2's half references are the half maps of round 1, and the outputs still
    hold every particle in input order. Each network trains as two gloo ranks under torchrun
    (train.processes: 2 on a machine without a GPU), with every option of the training command
    (half set, checkpoint folder, round 1's network and round 1's poses in round 2)."""
    import numpy as np
    import torch

    from z3lib.io import read_coefficients, read_map
    from z3lib.zart import half_sets

    train = {**yaml.safe_load((Path(__file__).parent / "config_tiny.yaml").read_text())["train"], "processes": 2}
    config = tiny_config(tmp_path, rounds=2, gold_standard="independent", train=train)
    result = snakemake(tmp_path, "--workflow-profile", str(CI_PROFILE), "--configfile", config, timeout=400)
    assert_ok(result)
    out = tmp_path / "results" / "tiny"
    halves = half_sets(read_particles(out / "preprocess/particles.star").table["random_subset"].to_numpy(), 0)
    assert len(np.intersect1d(*halves)) == 0 and sum(map(len, halves)) == 60
    for k in (1, 2):
        for h in (1, 2):
            meta = torch.load(out / f"rounds/{k}/train/half{h}/model.pt", weights_only=True)["meta"]
            np.testing.assert_array_equal(meta["rows"].numpy(), halves[h - 1])
            if k == 2:
                np.testing.assert_array_equal(
                    read_map(out / f"rounds/2/reference/half{h}/reference.mrc").data,
                    read_map(out / f"rounds/1/zart/corrected_half{h}.mrc").data,
                )
                log = (tmp_path / f"logs/tiny/rounds/2/train_half{h}.log").read_text()
                assert f"rounds/1/train/half{h}/model.pt" in log and f"half {h}: training on its" in log
                assert (
                    "torchrun: 2 training processes on the CPU" in log
                    and "rank 0 of 2 (local rank 0) on cpu, backend gloo" in log
                )
    for h in (1, 2):
        assert (out / f"train/half{h}/model.pt").read_bytes() == (out / f"rounds/2/train/half{h}/model.pt").read_bytes()
    assert read_coefficients(out / "refine/coefficients.npy").shape == (60, default_terms())
    refined = read_particles(out / "refine/particles.star")
    simulated = read_particles(out / "simulate/particles.star")
    assert refined.raw["rlnImageName"].tolist() == simulated.raw["rlnImageName"].tolist()
    assert "independent: each half set has its own networks" in (out / "report/report.html").read_text()
