"""Adapter of rule ``publish``: the final round's files copied to the stage paths
(z3lib.stages.rounds)."""

from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; logging setup

from z3lib.stages.rounds import publish_files

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

log = _bootstrap.configure_logging(snakemake.log[0], "z3.publish")
with _bootstrap.stage(log, f"publish round {snakemake.params.final_round}", snakemake.params.z3lib):
    publish_files(list(zip(snakemake.input, snakemake.output, strict=True)), log=log)
