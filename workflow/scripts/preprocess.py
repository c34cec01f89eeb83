"""Adapter of rule ``preprocess``: inputs at the processing box (z3lib.stages.preprocess)."""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.stages.preprocess import preprocess

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

with _bootstrap.job(snakemake, "z3.preprocess", "preprocess") as job:
    params = job.params
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
        model=snakemake.input.get("model"),  # zernike.points atoms only (common.smk: preprocess_inputs)
        log=job.log,
    )
    job.log.info("wrote %s", _bootstrap.written_list(written))
