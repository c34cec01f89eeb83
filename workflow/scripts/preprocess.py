"""Adapter of rule ``preprocess``: inputs at the processing box (z3lib.stages.preprocess)."""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; logging setup
import torch

from z3lib.stages.preprocess import preprocess

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

log = _bootstrap.configure_logging(snakemake.log[0], "z3.preprocess")
torch.set_num_threads(snakemake.threads)
params = snakemake.params
with _bootstrap.stage(log, "preprocess", params.z3lib, threads=snakemake.threads):
    written = preprocess(
        snakemake.input.particles,
        snakemake.input.reference,
        snakemake.input.get("mask"),  # optional for user data
        Path(snakemake.output.particles).parent,
        box=params.box,
        pixel_size=params.pixel_size,
        reference_pixel_size=params.reference_pixel_size,
        image_root=params.image_root,
        mask_threshold=params.mask_threshold,
        points_step=params.points_step,
        chunk_size=params.chunk_size,
        log=log,
    )
    log.info("wrote %s", _bootstrap.written_list(written))
