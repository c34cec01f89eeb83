"""Zernike3D flexibility analysis for cryo-EM: Zernike3Deep, classical refinement and ZART.

The library behind the z3 Snakemake workflow; ``__version__`` and the per-rule output versions
live here.
"""

__version__ = "0.1.14"

#: The library version at which each pipeline rule's numerical output last changed. Snakemake
#: cannot see library code, so every rule carries its entry in its params: a library change that
#: alters one stage's numbers bumps ``__version__`` and that stage's entry, and reruns exactly that
#: stage and (through their changed inputs) the stages after it, not the training before it.
#: Partial state of a killed job (training checkpoints, refinement progress) is keyed by
#: ``__version__`` itself, so none of it outlives any library change.
OUTPUT_VERSIONS: dict[str, str] = {
    "simulate": "0.1.9",  # the splat, positions and CTF filter reordered for speed (same numbers to rounding)
    "preprocess": "0.1.5",
    "train": "0.1.11",  # the encoder's reference channel projected on its own coarse grid
    "predict": "0.1.11",
    "refine_landscape": "0.1.14",  # joint scoring after the first population round (was one direction at a time)
    "refine_chunk": "0.1.10",
    "refine": "0.1.5",
    "zart": "0.1.12",  # the medoid frame's median from 4,096 rows per half (was 20,000; same below 8,192 particles)
    "round_reference": "0.1.5",
    "publish": "0.1.5",
    "report": "0.1.8",  # landscape.html and a cryoSPARC .cs per cluster
    "select": "0.1.8",
}
