# ZART: the deformation-corrected reconstruction (gold-standard halves, FSC) and, with the same
# code and zero fields, the uncorrected one. GPU rule (cupy); numpy on the CPU otherwise.


rule zart:
    input:
        particles="results/{run}/preprocess/particles.star",
        stack="results/{run}/preprocess/particles.mrcs",
        points="results/{run}/preprocess/points.npz",
        coefficients="results/{run}/refine/coefficients.npy",
    output:
        corrected="results/{run}/zart/corrected.mrc",
        half1="results/{run}/zart/corrected_half1.mrc",
        half2="results/{run}/zart/corrected_half2.mrc",
        uncorrected="results/{run}/zart/uncorrected.mrc",
        uncorrected_half1="results/{run}/zart/uncorrected_half1.mrc",
        uncorrected_half2="results/{run}/zart/uncorrected_half2.mrc",
        fsc="results/{run}/zart/fsc.tsv",
    log:
        "logs/{run}/zart.log",
    benchmark:
        "benchmarks/{run}/zart.tsv"
    conda:
        "../../envs/cupy.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime="4h",
    params:
        z3lib=Z3LIB_VERSION,
        zernike=lookup(dpath="zernike", within=config),
        zart=lookup(dpath="zart", within=config),
        seed=lookup(dpath="seed", within=config),
    script:
        "../scripts/zart.py"
