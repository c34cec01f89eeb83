# The report: landscape (PCA, UMAP, k-means), maps and models along the principal motions, one
# STAR per cluster for RELION, the Xmipp export, and a self-contained report.html. Cheap: it runs
# where Snakemake runs (localrule), on the CPU.


# The report stage's figures in the Snakemake report (snakemake --report), by output key
# (STAGE_OUTPUTS["report"], common.smk): report() arguments.
REPORT_FIGURES = {
    "html": {"caption": "../report/report_html.rst", "category": "Report"},
    "landscape_pca": {
        "caption": "../report/landscape.rst",
        "category": "Landscape",
        "labels": {"figure": "PCA"},
    },
    "landscape_umap": {
        "caption": "../report/landscape.rst",
        "category": "Landscape",
        "labels": {"figure": "UMAP"},
    },
    "motions": {
        "caption": "../report/motions.rst",
        "category": "Motions",
        "labels": {"figure": "motion series"},
    },
    "deformation": {
        "caption": "../report/deformation.rst",
        "category": "Motions",
        "labels": {"figure": "mean deformation"},
    },
    "fsc": {
        "caption": "../report/fsc.rst",
        "category": "Reconstruction",
        "labels": {"figure": "FSC"},
    },
    "slices": {
        "caption": "../report/slices.rst",
        "category": "Reconstruction",
        "labels": {"figure": "central slices"},
    },
}


rule report:
    input:
        unpack(report_inputs),
    output:
        # STAGE_OUTPUTS["report"] (common.smk), by key; REPORT_FIGURES flagged for the report
        **declared_outputs("report", "results/{run}/report", REPORT_FIGURES),
    log:
        "logs/{run}/report.log",
    benchmark:
        "benchmarks/{run}/report.tsv"
    localrule: True
    conda:
        "../../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime="1h",
    params:
        z3lib=output_version("report"),
        zernike=lookup(dpath="zernike", within=config),
        report=lookup(dpath="report", within=config),
        seed=lookup(dpath="seed", within=config),
        pixel_size=lookup(dpath="pixel_size", within=config),
        image_root=lookup(dpath="image_root", within=config),
        gold_standard=lookup(dpath="gold_standard", within=config),
        benchmarks=lambda wildcards: f"benchmarks/{wildcards.run}",
        # shown in the report; the selection is not (choosing particles does not remake the report)
        run_config={key: value for key, value in config.items() if key != "select"},
        # the input particle file (a .cs gives each cluster's .cs its rows with every field)
        source_particles=original_particles,
    script:
        "../scripts/report.py"


# Particles chosen from the landscape (config select): a RELION STAR with every input column and
# the refined values, a cryoSPARC .cs and the rows chosen. Cheap: where Snakemake runs.
rule select:
    input:
        unpack(select_inputs),
    output:
        **declared_outputs("select", "results/{run}/select"),
    log:
        "logs/{run}/select.log",
    benchmark:
        "benchmarks/{run}/select.tsv"
    localrule: True
    conda:
        "../../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="30m",
    params:
        z3lib=output_version("select"),
        select=lookup(dpath="select", within=config),
        source_particles=original_particles,
    script:
        "../scripts/select.py"
