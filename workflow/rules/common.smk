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
    files["report.model"] = cfg["report"]["model"]
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

# Goes into every rule's params: bump z3lib.__version__ whenever numerical output changes, so
# that library edits rerun exactly the affected results (Snakemake cannot see library code).
Z3LIB_VERSION = z3lib.__version__

RUN = config["run"]

# Main outputs of each stage (design.md §2): the contract between stages.
STAGE_OUTPUTS = {
    "simulate": [
        "particles.star",
        "particles.mrcs",
        "ground_truth.tsv",
        "motion.npz",
        "reference.mrc",
        "mask.mrc",
        "state_start.mrc",
        "state_end.mrc",
        "reference_model.pdb",
    ],
    "preprocess": [
        "particles.star",
        "particles.mrcs",
        "reference.mrc",
        "mask.mrc",
        "points.npz",
    ],
    "train": ["model.pt", "history.tsv"],
    "predict": ["particles.star", "coefficients.npy"],
    "refine": ["particles.star", "coefficients.npy"],
    "zart": [
        "corrected.mrc",
        "corrected_half1.mrc",
        "corrected_half2.mrc",
        "uncorrected.mrc",
        "fsc.tsv",
    ],
    # Also written (not declared: their number follows the config and the data): the motion
    # series motion/motion_pc{1,2}_NN.{mrc,pdb} and clusters/cluster_NN.{star,mrc,pdb}.
    "report": [
        "report.html",
        "landscape.tsv",
        "landscape_pca.png",
        "landscape_umap.png",
        "fsc.png",
        "slices.png",
        "particles.xmd",
        "mean_deformation.mrc",
        "motion/motion_pc1.cxc",
        "motion/motion_pc2.cxc",
        "clusters/clusters.cxc",
    ],
}

# Stages whose outputs `rule all` asks for; earlier ones are pulled in through their inputs.
FINAL_STAGES = ["report"]


wildcard_constraints:
    run=r"[A-Za-z0-9][A-Za-z0-9_.-]*",


# --- input functions ----------------------------------------------------------------------------
def stage_outputs(stage, run=RUN):
    """Main output paths of one stage of one run."""
    return [f"results/{run}/{stage}/{name}" for name in STAGE_OUTPUTS[stage]]


def final_targets():
    """Targets of `all`, the default target: main outputs of every final stage of this run."""
    return [path for stage in FINAL_STAGES for path in stage_outputs(stage)]


def is_demo():
    """True when the run simulates its own data (config `particles: null`)."""
    return config["particles"] is None


def original_particles(wildcards):
    """The particles as given (simulated for the demo): the STAR the user-facing outputs extend."""
    if is_demo():
        return f"results/{wildcards.run}/simulate/particles.star"
    return config["particles"]


def preprocess_inputs(wildcards):
    """Particles, reference and (optional) mask: simulated for the demo, else the user's files."""
    if is_demo():
        sim = f"results/{wildcards.run}/simulate"
        return {
            "particles": f"{sim}/particles.star",
            "stack": f"{sim}/particles.mrcs",
            "reference": f"{sim}/reference.mrc",
            "mask": f"{sim}/mask.mrc",
        }
    inputs = {"particles": config["particles"], "reference": config["reference"]}
    if config["mask"] is not None:
        inputs["mask"] = config["mask"]
    return inputs


def report_inputs(wildcards):
    """What the report reads: the refined fields, the preprocessed reference and mask, the ZART
    maps, and the atomic model (config report.model, else the demo's simulated reference model)
    plus, for the demo, the ground truth."""
    run = f"results/{wildcards.run}"
    inputs = {
        "particles": f"{run}/refine/particles.star",
        "coefficients": f"{run}/refine/coefficients.npy",
        "points": f"{run}/preprocess/points.npz",
        "reference": f"{run}/preprocess/reference.mrc",
        "mask": f"{run}/preprocess/mask.mrc",
        "corrected": f"{run}/zart/corrected.mrc",
        "uncorrected": f"{run}/zart/uncorrected.mrc",
        "fsc": f"{run}/zart/fsc.tsv",
    }
    if config["report"]["model"] is not None:
        inputs["model"] = config["report"]["model"]
    elif is_demo():
        inputs["model"] = f"{run}/simulate/reference_model.pdb"
    if is_demo():
        inputs["ground_truth"] = f"{run}/simulate/ground_truth.tsv"
    return inputs
