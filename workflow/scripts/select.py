"""Adapter of rule ``select``: particles chosen from the landscape → STAR, .cs (z3lib.selection)."""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.io import read_table
from z3lib.selection import SelectionCriteria, select_rows, write_selection

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

inputs = snakemake.input
with _bootstrap.job(snakemake, "z3.select", "select") as job:
    criteria = SelectionCriteria.from_config(dict(job.params.select))
    rows = select_rows(read_table(inputs.landscape), criteria, source=inputs.landscape)
    write_selection(
        Path(snakemake.output.star).parent,
        rows,
        particles=inputs.particles,
        source=job.params.source_particles,
        log=job.log,
    )
