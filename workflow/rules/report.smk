# The report: landscape (PCA, UMAP, k-means), maps and models along the principal motions, one
# STAR per cluster for RELION, the Xmipp export, and a self-contained report.html. Cheap: it runs
# where Snakemake runs (localrule), on the CPU.


rule report:
    input:
        unpack(report_inputs),
    output:
        html=report(
            "results/{run}/report/report.html",
            caption="../report/report_html.rst",
            category="Report",
        ),
        landscape="results/{run}/report/landscape.tsv",
        landscape_pca=report(
            "results/{run}/report/landscape_pca.png",
            caption="../report/landscape.rst",
            category="Landscape",
            labels={"figure": "PCA"},
        ),
        landscape_pca_svg="results/{run}/report/landscape_pca.svg",
        landscape_umap=report(
            "results/{run}/report/landscape_umap.png",
            caption="../report/landscape.rst",
            category="Landscape",
            labels={"figure": "UMAP"},
        ),
        landscape_umap_svg="results/{run}/report/landscape_umap.svg",
        motions=report(
            "results/{run}/report/motions.png",
            caption="../report/motions.rst",
            category="Motions",
            labels={"figure": "motion series"},
        ),
        deformation=report(
            "results/{run}/report/deformation.png",
            caption="../report/deformation.rst",
            category="Motions",
            labels={"figure": "mean deformation"},
        ),
        fsc=report(
            "results/{run}/report/fsc.png",
            caption="../report/fsc.rst",
            category="Reconstruction",
            labels={"figure": "FSC"},
        ),
        fsc_svg="results/{run}/report/fsc.svg",
        slices=report(
            "results/{run}/report/slices.png",
            caption="../report/slices.rst",
            category="Reconstruction",
            labels={"figure": "central slices"},
        ),
        mean_deformation="results/{run}/report/mean_deformation.mrc",
        xmd="results/{run}/report/particles.xmd",
        motion_pc1="results/{run}/report/motion/motion_pc1.cxc",
        motion_pc2="results/{run}/report/motion/motion_pc2.cxc",
        clusters="results/{run}/report/clusters/clusters.cxc",
        rounds="results/{run}/report/rounds.tsv",
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
        z3lib=Z3LIB_VERSION,
        zernike=lookup(dpath="zernike", within=config),
        report=lookup(dpath="report", within=config),
        seed=lookup(dpath="seed", within=config),
        pixel_size=lookup(dpath="pixel_size", within=config),
        image_root=lookup(dpath="image_root", within=config),
        gold_standard=lookup(dpath="gold_standard", within=config),
        benchmarks=lambda wildcards: f"benchmarks/{wildcards.run}",
        run_config=config,
    script:
        "../scripts/report.py"
