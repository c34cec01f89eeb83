# ZART: the deformation-corrected reconstruction (gold-standard halves, FSC) and, with the same
# code and zero fields, the uncorrected one, once per refinement round {k}, on the round's mask
# (each half on its own in independent mode), with the particles' latest poses and CTF (the
# round's refine STAR). GPU rule (cupy); numpy on the CPU otherwise.


rule zart:
    input:
        particles="results/{run}/preprocess/particles.star",
        stack="results/{run}/preprocess/particles.mrcs",
        points=round_points,
        coefficients="results/{run}/rounds/{k}/refine/coefficients.npy",
        # the latest poses and CTF (refined angles, shifts, defocus; the network's corrections)
        poses="results/{run}/rounds/{k}/refine/particles.star",
    output:
        # STAGE_OUTPUTS["zart"] (common.smk), by key
        **declared_outputs("zart", "results/{run}/rounds/{k}/zart"),
    log:
        "logs/{run}/rounds/{k}/zart.log",
    benchmark:
        "benchmarks/{run}/rounds/{k}/zart.tsv"
    conda:
        "../../envs/cupy.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime="4h",
    params:
        z3lib=output_version("zart"),
        zernike=lookup(dpath="zernike", within=config),
        zart=lookup(dpath="zart", within=config),
        seed=lookup(dpath="seed", within=config),
        pixel_size=lookup(dpath="pixel_size", within=config),
        image_root=lookup(dpath="image_root", within=config),
    script:
        "../scripts/zart.py"
