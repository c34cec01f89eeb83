"""Adapter of rule ``zart``: corrected and uncorrected reconstructions (z3lib.stages.zart)."""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.devices import zart_backend_for_job
from z3lib.stages.zart import zart
from z3lib.zart import ZartConfig

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

# No torch device: ZART runs on cupy or numpy, "auto" meaning numpy in a job without a GPU slot.
with _bootstrap.job(snakemake, "z3.zart", "zart") as job:
    params = job.params
    written = zart(
        snakemake.input.particles,
        list(snakemake.input.points),  # one point cloud, or one per half set
        snakemake.input.coefficients,
        Path(snakemake.output.corrected).parent,
        zernike=params.zernike,
        config=ZartConfig.from_config(params.zart, seed=params.seed),
        backend=zart_backend_for_job(params.zart["backend"], gpu_slot=job.gpu_slot),
        poses=snakemake.input.poses,
        pixel_size=params.pixel_size,
        image_root=params.image_root,
        log=job.log,
    )
    job.log.info("wrote %s", _bootstrap.written_list(written))
