"""Adapter of rule ``report``: landscape, motions, clusters, exports, HTML (z3lib.report)."""

from pathlib import Path
from typing import TYPE_CHECKING

import _bootstrap  # repository root on sys.path; per-job setup

from z3lib.report import make_report

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake  # noqa: TC004  (injected by the preamble)

inputs = snakemake.input
with _bootstrap.job(snakemake, "z3.report", "report") as job:
    params = job.params
    written = make_report(
        Path(snakemake.output.html).parent,
        particles=inputs.particles,
        coefficients=inputs.coefficients,
        points=inputs.points,
        reference=inputs.reference,
        mask=inputs.mask,
        corrected=inputs.corrected,
        uncorrected=inputs.uncorrected,
        fsc=inputs.fsc,
        zernike=params.zernike,
        clusters=params.report["clusters"],
        motion_steps=params.report["motion_steps"],
        use_umap=params.report["umap"],
        model=inputs.get("model"),  # optional: config model, or the demo's model
        ground_truth=inputs.get("ground_truth"),  # the demo only
        benchmarks=params.benchmarks,
        run_config=dict(params.run_config),
        run_name=snakemake.wildcards.run,
        seed=params.seed,
        pixel_size=params.pixel_size,
        image_root=params.image_root,
        round_fsc=list(inputs.round_fsc),  # every refinement round, round 1 first
        round_coefficients=list(inputs.round_coefficients),
        gold_standard=params.gold_standard,
        # another run's fsc.tsv, read as it is: a param, not an input, so that Snakemake never
        # plans to remake the other run's files with this run's config
        compare_fsc=params.report["compare_fsc"],
        source_particles=params.source_particles,
        log=job.log,
    )
    job.log.info("wrote %d files, the report is %s", len(written), written["html"])
