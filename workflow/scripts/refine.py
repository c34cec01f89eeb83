"""Adapter of rule ``refine``: gather the refined chunks in STAR order (z3lib.stages.refine)."""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.stages.refine import gather_refined

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

with _bootstrap.job(snakemake, "z3.refine", "refine gather") as job:
    params = job.params
    written = gather_refined(
        list(snakemake.input.chunks),
        snakemake.input.original,
        Path(snakemake.output.particles).parent,
        zernike=params.zernike,
        pixel_size=params.pixel_size,
        image_root=params.image_root,
        log=job.log,
    )
    job.log.info("wrote %s", _bootstrap.written_list(written))
