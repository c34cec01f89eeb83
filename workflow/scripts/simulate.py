"""Adapter of rule ``simulate``: the demo dataset (z3lib.stages.simulate)."""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.stages.simulate import simulate_dataset

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

with _bootstrap.job(snakemake, "z3.simulate", "simulate") as job:
    params = job.params
    written = simulate_dataset(
        Path(snakemake.output.particles).parent,
        start_model=snakemake.input.start_model,
        end_model=snakemake.input.end_model,
        n_particles=params.n_particles,
        box=params.box,
        pixel_size=params.pixel_size,
        resolution=params.resolution,
        snr=params.snr,
        seed=params.seed,
        reference_t=params.reference_t,
        log=job.log,
    )
    job.log.info("wrote %s", _bootstrap.written_list(written))
