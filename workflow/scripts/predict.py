"""Adapter of rule ``predict``: every particle's coefficients (z3lib.stages.predict)."""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; logging setup
import torch

from z3lib.devices import select_device
from z3lib.stages.predict import predict

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

log = _bootstrap.configure_logging(snakemake.log[0], "z3.predict")
torch.set_num_threads(snakemake.threads)
params = snakemake.params
device = select_device(bool(snakemake.resources.get("gpu", 0)), log)
with _bootstrap.stage(log, "predict", params.z3lib, threads=snakemake.threads):
    written = predict(
        list(snakemake.input.models),  # one network, or one per half set
        snakemake.input.particles,
        snakemake.input.original,
        Path(snakemake.output.particles).parent,
        device=device,
        batch_size=params.batch_size,
        pixel_size=params.pixel_size,
        image_root=params.image_root,
        poses=snakemake.input.get("poses"),  # round k >= 2: round k-1's refined poses and CTF
        log=log,
    )
    log.info("wrote %s", _bootstrap.written_list(written))
