# Shared by every rule: config validation, constants, wildcard constraints, input functions.
# Included first by the Snakefile, so nothing reads `config` before it is validated.

import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


# --- configuration ------------------------------------------------------------------------------
def describe_config_error(error):
    """One line naming the offending key of a jsonschema ValidationError."""
    where = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        names = ", ".join(repr(f"{where}.{key}" if where else key) for key in unknown)
        scope = f"under '{where}'" if where else "at the top level"
        return f"Unknown config key {names}: the keys allowed {scope} are {', '.join(allowed)}."
    if error.validator == "not":
        return f"Invalid value for config key '{where}': {error.instance!r} is reserved."
    return f"Invalid value for config key '{where or '<top level>'}': {error.message}."


# The schema fills in every default and rejects unknown keys (additionalProperties: false).
if isinstance(config.get("report"), dict) and "model" in config["report"]:
    raise WorkflowError(
        "Config key 'report.model' moved to the top level in z3lib 0.1.8: write `model: <file>` "
        "(the model is now used by training too, with zernike.points: atoms)."
    )
try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError as error:
    cause = error.__context__  # the jsonschema ValidationError, when there is one
    if not hasattr(cause, "absolute_path"):
        raise
    schema_note = "Every key, its type and default: workflow/schemas/config.schema.yaml."
    raise WorkflowError(f"{describe_config_error(cause)} {schema_note}") from None


def check_config(cfg):
    """Cross-key rules the schema cannot express, and input files that must exist.

    Relative paths are relative to the working directory (the repository root or --directory).
    """
    if cfg["particles"] is not None and cfg["reference"] is None:
        raise WorkflowError(
            f"Config key 'reference' is required when 'particles' is set "
            f"(particles: {cfg['particles']!r}): give the consensus map (MRC) of that refinement. "
            "Only the demo (particles: null) simulates its own reference."
        )
    if cfg["zernike"]["points"] == "atoms":
        if cfg["model"] is None and cfg["particles"] is not None:
            raise WorkflowError(
                "Config key 'zernike.points' is 'atoms' but 'model' is null: give the atomic model "
                "(PDB/mmCIF) fitted into the consensus map, or use zernike.points: voxels."
            )
        if cfg["rounds"] > 1:
            raise WorkflowError(
                f"Config keys 'zernike.points'='atoms' and 'rounds'={cfg['rounds']}: the atoms are "
                "fitted to the consensus map only; use rounds: 1 with atoms, or voxels for rounds."
            )
    if cfg["zernike"]["L2"] > cfg["zernike"]["L1"]:
        raise WorkflowError(
            f"Config keys 'zernike.L1'={cfg['zernike']['L1']} and 'zernike.L2'="
            f"{cfg['zernike']['L2']}: Zernike3D needs L1 >= L2."
        )
    if cfg["particles"] is None:
        files = {
            "demo.start_model": cfg["demo"]["start_model"],
            "demo.end_model": cfg["demo"]["end_model"],
        }
        if cfg["box"] > cfg["demo"]["box"]:
            raise WorkflowError(
                f"Config key 'box'={cfg['box']} exceeds 'demo.box'={cfg['demo']['box']}: the "
                "processing box is a Fourier crop of the particle box and cannot be larger."
            )
    else:
        files = {key: cfg[key] for key in ("particles", "reference", "mask")}
    files["model"] = cfg["model"]
    files["report.compare_fsc"] = cfg["report"]["compare_fsc"]
    files["select.file"] = cfg["select"]["file"]
    for key, path in files.items():
        if path is not None and not os.path.isfile(path):
            raise WorkflowError(
                f"Config key '{key}': file not found: {path!r} "
                f"(relative paths are relative to the working directory {os.getcwd()!r})."
            )
    root = cfg["image_root"]
    if root is not None and not os.path.isdir(root):
        raise WorkflowError(
            f"Config key 'image_root': folder not found: {root!r} "
            f"(relative paths are relative to the working directory {os.getcwd()!r})."
        )


check_config(config)


# --- constants ----------------------------------------------------------------------------------
# z3lib is imported from this checkout (the same one the scripts import through _bootstrap.py).
sys.path.insert(0, str(Path(workflow.basedir).resolve()))
import z3lib  # noqa: E402


def output_version(rule_name):
    """The z3lib version at which `rule_name`'s numerical output last changed, for its params
    (z3lib.OUTPUT_VERSIONS): library edits rerun exactly the affected results."""
    return z3lib.OUTPUT_VERSIONS[rule_name]


RUN = config["run"]

# The files each stage writes under results/<run>/<stage>/ (docs/architecture.md: the contract
# between stages), by the key of its rule's output. Declared here only: the stage rules build their
# `output:` from it (declared_outputs), and `all`'s targets (final_targets) and the published
# copies of the final round (PUBLISHED) come from it too, so they cannot drift apart. The rules keep
# their wildcard folder in view; the scripts read the files by these keys (snakemake.output.<key>).
STAGE_OUTPUTS = {
    "simulate": {
        "particles": "particles.star",
        "stack": "particles.mrcs",
        "ground_truth": "ground_truth.tsv",
        "motion": "motion.npz",
        "reference": "reference.mrc",
        "mask": "mask.mrc",
        "truth_reference": "truth_reference.mrc",
        "state_start": "state_start.mrc",
        "state_end": "state_end.mrc",
        "reference_model": "reference_model.pdb",
    },
    "preprocess": {
        "particles": "particles.star",
        "stack": "particles.mrcs",
        "reference": "reference.mrc",
        "mask": "mask.mrc",
        "points": "points.npz",
    },
    "train": {"model": "model.pt", "history": "history.tsv", "points": "points.npz"},
    "predict": {"particles": "particles.star", "coefficients": "coefficients.npy"},
    "refine": {"particles": "particles.star", "coefficients": "coefficients.npy"},
    "zart": {
        "corrected": "corrected.mrc",
        "half1": "corrected_half1.mrc",
        "half2": "corrected_half2.mrc",
        "uncorrected": "uncorrected.mrc",
        "fsc": "fsc.tsv",
        "field_scale": "field_scale.tsv",
        "uncorrected_half1": "uncorrected_half1.mrc",
        "uncorrected_half2": "uncorrected_half2.mrc",
    },
    # Also written (not declared: their number follows the config and the data): the motion
    # series motion/motion_pc{1,2}_NN.{mrc,pdb} and clusters/cluster_NN.{star,mrc,pdb}.
    # The figures of the Snakemake report are flagged in report.smk (REPORT_FIGURES).
    "report": {
        "html": "report.html",
        "landscape": "landscape.tsv",
        "landscape_pca": "landscape_pca.png",
        "landscape_pca_svg": "landscape_pca.svg",
        "landscape_umap": "landscape_umap.png",
        "landscape_umap_svg": "landscape_umap.svg",
        "motions": "motions.png",
        "deformation": "deformation.png",
        "fsc": "fsc.png",
        "fsc_svg": "fsc.svg",
        "slices": "slices.png",
        "mean_deformation": "mean_deformation.mrc",
        "xmd": "particles.xmd",
        "motion_pc1": "motion/motion_pc1.cxc",
        "motion_pc2": "motion/motion_pc2.cxc",
        "clusters": "clusters/clusters.cxc",
        "rounds": "rounds.tsv",
        "explorer": "landscape.html",
    },
    # the chosen particles (written only when config select names a criterion)
    "select": {"star": "particles.star", "cs": "particles.cs", "indices": "indices.txt"},
}

# zernike.points atoms: preprocess fits the atomic model's atoms to the consensus map
# (atoms.npz), the cloud that training and refinement move; ZART keeps the voxels.
ATOMS = config["zernike"]["points"] == "atoms"
if ATOMS:
    STAGE_OUTPUTS["preprocess"]["atoms"] = "atoms.npz"

# Stages whose outputs `rule all` asks for; earlier ones are pulled in through their inputs.
FINAL_STAGES = ["report"]

# Flexible refinement rounds (docs/architecture.md): train → predict → refine → zart run once per round
# under results/<run>/rounds/<k>/; round k >= 2 fine-tunes round k-1's network against a
# reference made from round k-1's corrected map (rule round_reference). Rule publish copies the
# final round's files to the stage paths results/<run>/{train,predict,refine,zart}/.
ROUNDS = config["rounds"]
# gold_standard: independent gives each half set its own networks (rule train_half), its own
# refinement and, from round 2 on, its own reference (rule round_reference_half).
INDEPENDENT = config["gold_standard"] == "independent"
# train.processes: rule train runs that many torchrun ranks, one GPU each (resources gpu).
TRAIN_PROCESSES = config["train"]["processes"]
HALVES = [1, 2]
# Stages that run once per round, and their files inside results/<run>/rounds/<k>/<stage>/.
ROUND_STAGES = ["train", "predict", "refine", "zart"]
ROUND_FILES = {stage: list(STAGE_OUTPUTS[stage].values()) for stage in ROUND_STAGES}
if INDEPENDENT:  # one network per half set, in train/half<h>/
    ROUND_FILES["train"] = [f"half{h}/{name}" for h in HALVES for name in ROUND_FILES["train"]]
# The stage paths rule publish writes, in pipeline order (relative to results/<run>/).
PUBLISHED = [f"{stage}/{name}" for stage in ROUND_STAGES for name in ROUND_FILES[stage]]


wildcard_constraints:
    run=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    k=r"[1-9][0-9]*",
    half=r"[12]",


# --- output and input functions -----------------------------------------------------------------
def declared_outputs(stage, folder, figures=None):
    """The output section of the rules of a stage, called once as such a rule is parsed (it is
    no input function). The files of STAGE_OUTPUTS[stage] in folder (a pattern with wildcards),
    by key; the keys in figures are flagged for the Snakemake report with the report()
    arguments given there (caption, category, labels)."""
    figures = figures or {}
    paths = {key: f"{folder}/{name}" for key, name in STAGE_OUTPUTS[stage].items()}
    return {
        key: report(path, **figures[key]) if key in figures else path for key, path in paths.items()
    }


def stage_outputs(stage, run=RUN):
    """Main output paths of one stage of one run."""
    return [f"results/{run}/{stage}/{name}" for name in STAGE_OUTPUTS[stage].values()]


def selecting():
    """True when config select names a criterion (a file, clusters or a PC range)."""
    sel = config["select"]
    return sel["file"] is not None or bool(sel["clusters"]) or sel["pc"] is not None


def final_targets():
    """Targets of `all`, the default target: main outputs of every final stage of this run, and
    the selection's files when config select names a criterion."""
    targets = [path for stage in FINAL_STAGES for path in stage_outputs(stage)]
    return targets + (stage_outputs("select") if selecting() else [])


def is_demo():
    """True when the run simulates its own data (config `particles: null`)."""
    return config["particles"] is None


def original_particles(wildcards):
    """The particles as given (simulated for the demo): the STAR the user-facing outputs extend."""
    if is_demo():
        return f"results/{wildcards.run}/simulate/particles.star"
    return config["particles"]


def preprocess_inputs(wildcards):
    """Particles, reference and (optional) mask: simulated for the demo, else the user's files;
    with zernike.points atoms, the atomic model too (config model, else the demo's own)."""
    sim = f"results/{wildcards.run}/simulate"
    if is_demo():
        inputs = {
            "particles": f"{sim}/particles.star",
            "stack": f"{sim}/particles.mrcs",
            "reference": f"{sim}/reference.mrc",
            "mask": f"{sim}/mask.mrc",
        }
    else:
        inputs = {"particles": config["particles"], "reference": config["reference"]}
        if config["mask"] is not None:
            inputs["mask"] = config["mask"]
    if ATOMS:
        inputs["model"] = config["model"] or f"{sim}/reference_model.pdb"
    return inputs


def round_path(wildcards, k, stage, name):
    """A file of refinement round k: results/<run>/rounds/<k>/<stage>/<name>."""
    return f"results/{wildcards.run}/rounds/{k}/{stage}/{name}"


def reference_files(wildcards, k, half=None):
    """Reference, mask and point cloud that round k works against: the preprocess stage's in
    round 1; round k-1's corrected map (or, for an independent half, that half's map) after."""
    if int(k) == 1:
        folder = f"results/{wildcards.run}/preprocess"
    elif half:
        folder = f"results/{wildcards.run}/rounds/{k}/reference/half{half}"
    else:
        folder = f"results/{wildcards.run}/rounds/{k}/reference"
    return {
        name: f"{folder}/{name}.{ext}"
        for name, ext in (("reference", "mrc"), ("mask", "mrc"), ("points", "npz"))
    }


def round_points(wildcards):
    """Point clouds of round {k}: one (shared mode, or independent mode in round 1, where both
    halves start from the consensus reference) or one per half set."""
    if INDEPENDENT and int(wildcards.k) > 1:
        return [reference_files(wildcards, wildcards.k, h)["points"] for h in HALVES]
    return [reference_files(wildcards, wildcards.k)["points"]]


def round_network_points(wildcards):
    """The point clouds the round's networks ended with (the learned reference with
    train.learn_reference): refinement works against them; one per half in independent mode."""
    if INDEPENDENT:
        return [round_path(wildcards, wildcards.k, "train", f"half{h}/points.npz") for h in HALVES]
    return [round_path(wildcards, wildcards.k, "train", "points.npz")]


# The population's landscape (written by refine_landscape): one fit, or one per independent half.
POPULATION = config["refine"]["mode"] == "landscape" and config["refine"]["population_rounds"] > 0
LANDSCAPE_FILES = [f"landscape_half{h}.npz" for h in HALVES] if INDEPENDENT else ["landscape.npz"]
LANDSCAPE_OUTPUTS = [f"results/{{run}}/rounds/{{k}}/refine/{name}" for name in LANDSCAPE_FILES]


def round_landscapes(wildcards):
    """The landscape fits refinement of round {k} starts from (none without a population fit)."""
    if not POPULATION:
        return []
    return [round_path(wildcards, wildcards.k, "refine", name) for name in LANDSCAPE_FILES]


def round_reference_volume(wildcards):
    """The map the reference of round {k} (>= 2) is made from: round k-1's corrected map, or
    its half {half} (rule round_reference_half)."""
    half = wildcards.get("half")
    name = f"corrected_half{half}.mrc" if half else "corrected.mrc"
    return round_path(wildcards, int(wildcards.k) - 1, "zart", name)


def round_poses(wildcards):
    """The latest poses and CTF that the network of round {k} trains and predicts with: none in
    round 1 (the preprocess stage's, i.e. the particles as given); from round 2 on, round k-1's
    refine STAR (its refined angles, shifts and defocus, and the network's pose corrections)."""
    k = int(wildcards.k)
    if k == 1:
        return {}
    return {"poses": round_path(wildcards, k - 1, "refine", "particles.star")}


def train_inputs(wildcards):
    """Particles, the round's point cloud (the half's own in independent mode) and, from round
    2 on, the previous round's network (of the same half) to fine-tune and the previous round's
    refined poses (round_poses)."""
    half = wildcards.get("half")
    k = int(wildcards.k)
    pre = f"results/{wildcards.run}/preprocess"
    inputs = {
        "particles": f"{pre}/particles.star",
        "stack": f"{pre}/particles.mrcs",
        "points": (
            f"{pre}/atoms.npz"
            if ATOMS
            else reference_files(wildcards, k, half if k > 1 else None)["points"]
        ),
        **round_poses(wildcards),
    }
    if k > 1:
        inputs["init"] = round_path(
            wildcards, k - 1, "train", f"half{half}/model.pt" if half else "model.pt"
        )
    return inputs


def train_params(wildcards):
    """Half set (0 = all particles) and checkpoint folder of a train or train_half job: one
    folder per round and half, so that a checkpoint never meets another round's inputs."""
    half = wildcards.get("half")
    folder = f"half{half}/checkpoint" if half else "checkpoint"
    return {
        "half": int(half) if half else 0,
        "checkpoint_dir": round_path(wildcards, wildcards.k, "train", folder),
    }


def round_models(wildcards):
    """The network(s) of round {k}: one, or one per half set (independent mode)."""
    if INDEPENDENT:
        return [round_path(wildcards, wildcards.k, "train", f"half{h}/model.pt") for h in HALVES]
    return [round_path(wildcards, wildcards.k, "train", "model.pt")]


def publish_inputs(wildcards):
    """The final round's files, in the order of PUBLISHED."""
    return [f"results/{wildcards.run}/rounds/{ROUNDS}/{path}" for path in PUBLISHED]


def report_inputs(wildcards):
    """What the report reads: the refined fields, the final round's reference and mask, the ZART
    maps, every round's FSC and fields, and the atomic model (config model, else the demo's simulated reference model)
    plus, for the demo, the ground truth."""
    run = f"results/{wildcards.run}"
    inputs = {
        "particles": f"{run}/refine/particles.star",
        "coefficients": f"{run}/refine/coefficients.npy",
        **reference_files(wildcards, ROUNDS),  # what the final round's fields were refined against
        "corrected": f"{run}/zart/corrected.mrc",
        "uncorrected": f"{run}/zart/uncorrected.mrc",
        "fsc": f"{run}/zart/fsc.tsv",
        # every round, for the per-round table and landscapes
        "round_fsc": [round_path(wildcards, k, "zart", "fsc.tsv") for k in range(1, ROUNDS + 1)],
        "round_coefficients": [
            round_path(wildcards, k, "refine", "coefficients.npy") for k in range(1, ROUNDS + 1)
        ],
    }
    if config["model"] is not None:
        inputs["model"] = config["model"]
    elif is_demo():
        inputs["model"] = f"{run}/simulate/reference_model.pdb"
    if is_demo():
        inputs["ground_truth"] = f"{run}/simulate/ground_truth.tsv"
    return inputs


def select_inputs(wildcards):
    """The refined particles, the landscape, and the selection file when one is given."""
    run = f"results/{wildcards.run}"
    inputs = {
        "particles": f"{run}/refine/particles.star",
        "landscape": f"{run}/report/landscape.tsv",
    }
    if config["select"]["file"] is not None:
        inputs["file"] = config["select"]["file"]
    return inputs
