"""Adapter of rule ``refine_landscape``: the landscape fitted to all particles (z3lib.stages.refine)."""

from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; logging setup
import torch

from z3lib.devices import select_device
from z3lib.refine import RefineConfig
from z3lib.stages.refine import refine_landscape

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

log = _bootstrap.configure_logging(snakemake.log[0], "z3.refine")
torch.set_num_threads(snakemake.threads)
params = snakemake.params
device = select_device(bool(snakemake.resources.get("gpu", 0)), log)
with _bootstrap.stage(log, "population landscape", params.z3lib, threads=snakemake.threads):
    refine_landscape(
        snakemake.input.particles,
        list(snakemake.input.points),  # one point cloud, or one per half set
        snakemake.input.prior,
        list(snakemake.output.landscapes),
        degrees=(params.zernike["L1"], params.zernike["L2"]),
        basis=params.zernike["basis"],
        config=RefineConfig.from_config(params.refine),
        device=device,
        independent_halves=params.gold_standard == "independent",
        seed=params.seed,
        poses=snakemake.input.poses,
        pixel_size=params.pixel_size,
        image_root=params.image_root,
        roughness=params.roughness,
        log=log,
    )
