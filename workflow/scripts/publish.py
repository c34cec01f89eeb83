"""Adapter of rule ``publish``: the final round's files copied to the stage paths
(z3lib.stages.rounds)."""

from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.stages.rounds import publish_files

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

label = f"publish round {snakemake.params.final_round}"
with _bootstrap.job(snakemake, "z3.publish", label) as job:
    publish_files(list(zip(snakemake.input, snakemake.output, strict=True)), log=job.log)
