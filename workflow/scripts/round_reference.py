"""Adapter of rules ``round_reference`` and ``round_reference_half``: the next refinement
round's reference, mask and point cloud from a corrected map (z3lib.stages.rounds)."""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.stages.rounds import reference_from_map

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

with _bootstrap.job(snakemake, "z3.rounds", f"reference of round {snakemake.wildcards.k}") as job:
    written = reference_from_map(
        snakemake.input.volume,
        snakemake.input.template,
        Path(snakemake.output.points).parent,
        log=job.log,
    )
    job.log.info("wrote %s", _bootstrap.written_list(written))
