"""Adapter of rule ``predict``: every particle's coefficients (z3lib.stages.predict)."""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.stages.predict import predict

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

with _bootstrap.job(snakemake, "z3.predict", "predict", torch_device=True) as job:
    written = predict(
        list(snakemake.input.models),  # one network, or one per half set
        snakemake.input.particles,
        snakemake.input.original,
        Path(snakemake.output.particles).parent,
        device=job.device,
        batch_size=job.params.batch_size,
        pixel_size=job.params.pixel_size,
        image_root=job.params.image_root,
        poses=snakemake.input.get("poses"),  # round k >= 2: round k-1's refined poses and CTF
        log=job.log,
    )
    job.log.info("wrote %s", _bootstrap.written_list(written))
