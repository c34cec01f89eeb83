"""Adapter of rule ``train``: Zernike3Deep training (z3lib.stages.train)."""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.network import NetworkConfig
from z3lib.stages.train import train

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

with _bootstrap.job(snakemake, "z3.train", "train", torch_device=True) as job:
    params = job.params
    written = train(
        snakemake.input.particles,
        snakemake.input.points,
        Path(snakemake.output.model).parent,
        NetworkConfig.from_config(params.zernike, params.train, seed=params.seed),
        checkpoint_dir=params.checkpoint_dir,
        device=job.device,
        init_model=snakemake.input.get("init"),  # round k >= 2: fine-tune round k-1's network
        half=params.half or None,  # independent gold-standard halves: 1 or 2
        poses=snakemake.input.get("poses"),  # round k >= 2: round k-1's refined poses and CTF
        pixel_size=params.pixel_size,
        image_root=params.image_root,
        log=job.log,
    )
    job.log.info("wrote %s", _bootstrap.written_list(written))
