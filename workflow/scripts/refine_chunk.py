"""Adapter of rule ``refine_chunk``: one chunk of the per-particle refinement (z3lib.stages.refine)."""

import re
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; logging setup
import torch

from z3lib.devices import select_device
from z3lib.refine import RefineConfig
from z3lib.stages.refine import refine_chunk

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

log = _bootstrap.configure_logging(snakemake.log[0], "z3.refine")
torch.set_num_threads(snakemake.threads)
params = snakemake.params
item, n_items = (int(v) for v in re.fullmatch(r"(\d+)-of-(\d+)", snakemake.wildcards.scatteritem).groups())
device = select_device(bool(snakemake.resources.get("gpu", 0)), log)
with _bootstrap.stage(log, f"refine chunk {item} of {n_items}", params.z3lib, threads=snakemake.threads):
    refine_chunk(
        snakemake.input.particles,
        list(snakemake.input.points),  # one point cloud, or one per half set
        snakemake.input.prior,
        snakemake.output.chunk,
        chunk=item - 1,
        n_chunks=n_items,
        degrees=(params.zernike["L1"], params.zernike["L2"]),
        basis=params.zernike["basis"],
        config=RefineConfig.from_config(params.refine),
        device=device,
        progress_path=params.progress,
        independent_halves=params.gold_standard == "independent",
        seed=params.seed,
        poses=snakemake.input.poses,
        pixel_size=params.pixel_size,
        image_root=params.image_root,
        roughness=params.roughness,
        log=log,
        landscapes=list(snakemake.input.landscapes),  # the population's fit(s); none without one
    )
