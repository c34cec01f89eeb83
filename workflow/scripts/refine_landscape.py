"""Adapter of rule ``refine_landscape``: the landscape fitted to all particles (z3lib.stages.refine)."""

from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.refine import RefineConfig
from z3lib.stages.refine import refine_landscape

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

with _bootstrap.job(snakemake, "z3.refine", "population landscape", torch_device=True) as job:
    params = job.params
    refine_landscape(
        snakemake.input.particles,
        list(snakemake.input.points),  # one point cloud, or one per half set
        snakemake.input.prior,
        list(snakemake.output.landscapes),
        zernike=params.zernike,
        config=RefineConfig.from_config(params.refine),
        device=job.device,
        independent_halves=params.gold_standard == "independent",
        seed=params.seed,
        poses=snakemake.input.poses,
        pixel_size=params.pixel_size,
        image_root=params.image_root,
        roughness=params.roughness,
        log=job.log,
    )
