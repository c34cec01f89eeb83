# z3: Zernike3D flexibility analysis for cryo-EM (design: ../shared/design.md).
#
#   snakemake                          the embedded demo (config.yaml), profile profiles/default
#   snakemake --configfile my.yaml     your data
#   snakemake --workflow-profile slurm on a SLURM cluster
#
# Results: results/<run>/<stage>/, logs: logs/<run>/<rule>.log,
# benchmark files: benchmarks/<run>/<rule>.tsv. Stages: simulate (demo only), preprocess, train,
# predict, refine, zart, report (results/<run>/report/report.html is the page to open first).

from snakemake.utils import min_version

min_version("9.19")


configfile: "config.yaml"


# Per-particle refinement runs in this many chunks (config refine.chunks; sites may override it
# with --set-scatter refine=N).
scattergather:
    refine=config.get("refine", {}).get("chunks", 2),


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/network.smk"
include: "workflow/rules/refine.smk"
include: "workflow/rules/reconstruct.smk"
include: "workflow/rules/rounds.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_targets(),
    localrule: True
