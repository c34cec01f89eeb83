"""Adapter of rule ``train``: Zernike3Deep training (z3lib.stages.train)."""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; logging setup
import torch

from z3lib.devices import select_device
from z3lib.network import NetworkConfig
from z3lib.stages.train import train

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

log = _bootstrap.configure_logging(snakemake.log[0], "z3.train")
torch.set_num_threads(snakemake.threads)
params = snakemake.params
device = select_device(bool(snakemake.resources.get("gpu", 0)), log)
config = NetworkConfig.from_config(params.zernike, params.train, seed=params.seed)
with _bootstrap.stage(log, "train", params.z3lib, threads=snakemake.threads):
    written = train(
        snakemake.input.particles,
        snakemake.input.points,
        Path(snakemake.output.model).parent,
        config,
        checkpoint_dir=params.checkpoint_dir,
        device=device,
        init_model=snakemake.input.get("init"),  # round k >= 2: fine-tune round k-1's network
        half=params.half or None,  # independent gold-standard halves: 1 or 2
        poses=snakemake.input.get("poses"),  # round k >= 2: round k-1's refined poses and CTF
        pixel_size=params.pixel_size,
        image_root=params.image_root,
        log=log,
    )
    log.info("wrote %s", _bootstrap.written_list(written))
