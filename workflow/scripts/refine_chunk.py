"""Adapter of rule ``refine_chunk``: one chunk of the per-particle refinement (z3lib.stages.refine)."""

import re
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.refine import RefineConfig
from z3lib.stages.refine import refine_chunk

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

item, n_items = (int(v) for v in re.fullmatch(r"(\d+)-of-(\d+)", snakemake.wildcards.scatteritem).groups())
with _bootstrap.job(snakemake, "z3.refine", f"refine chunk {item} of {n_items}", torch_device=True) as job:
    params = job.params
    refine_chunk(
        snakemake.input.particles,
        list(snakemake.input.points),  # one point cloud, or one per half set
        snakemake.input.prior,
        snakemake.output.chunk,
        chunk=item - 1,
        n_chunks=n_items,
        zernike=params.zernike,
        config=RefineConfig.from_config(params.refine),
        device=job.device,
        progress_path=params.progress,
        independent_halves=params.gold_standard == "independent",
        seed=params.seed,
        poses=snakemake.input.poses,
        pixel_size=params.pixel_size,
        image_root=params.image_root,
        roughness=params.roughness,
        log=job.log,
        landscapes=list(snakemake.input.landscapes),  # the population's fit(s); none without one
    )
