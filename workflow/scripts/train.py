"""Adapter of rule ``train``: Zernike3Deep training (z3lib.stages.train).

With ``train.processes`` above 1 the training runs as that many torchrun ranks of the stage's
command (``python -m z3lib.stages.train``), which share the job's threads and GPUs.
"""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.network import NetworkConfig
from z3lib.stages.train import torchrun_training, train

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

with _bootstrap.job(snakemake, "z3.train", "train", torch_device=True) as job:
    params = job.params
    arguments = {
        "checkpoint_dir": params.checkpoint_dir,
        "init_model": snakemake.input.get("init"),  # round k >= 2: fine-tune round k-1's network
        "half": params.half or None,  # independent gold-standard halves: 1 or 2
        "poses": snakemake.input.get("poses"),  # round k >= 2: round k-1's refined poses and CTF
        "pixel_size": params.pixel_size,
        "image_root": params.image_root,
    }
    out = Path(snakemake.output.model).parent
    if params.train["processes"] > 1:
        torchrun_training(
            snakemake.input.particles,
            snakemake.input.points,
            out,
            {"zernike": params.zernike, "train": params.train, "seed": params.seed},
            processes=params.train["processes"],
            device=job.device,
            threads=job.threads,
            log_file=snakemake.log[0],
            log=job.log,
            **arguments,
        )
        written = {"model": out / "model.pt"}
    else:
        written = train(
            snakemake.input.particles,
            snakemake.input.points,
            out,
            NetworkConfig.from_config(params.zernike, params.train, seed=params.seed),
            device=job.device,
            log=job.log,
            **arguments,
        )
    job.log.info("wrote %s", _bootstrap.written_list(written))
