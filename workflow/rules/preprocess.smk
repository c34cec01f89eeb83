# Particles, reference and mask read, validated, Fourier-cropped to the processing box and
# normalised; the point cloud of the mask; a STAR for the processed particles.


rule preprocess:
    input:
        unpack(preprocess_inputs),
    output:
        # STAGE_OUTPUTS["preprocess"] (common.smk), by key
        **declared_outputs("preprocess", "results/{run}/preprocess"),
    log:
        "logs/{run}/preprocess.log",
    benchmark:
        "benchmarks/{run}/preprocess.tsv"
    conda:
        "../../envs/base.yaml"
    threads: 4
    resources:
        mem_mb=8000,
        runtime="1h",
    params:
        z3lib=output_version("preprocess"),
        box=lookup(dpath="box", within=config),
        pixel_size=lookup(dpath="pixel_size", within=config),
        reference_pixel_size=lookup(dpath="reference_pixel_size", within=config),
        image_root=lookup(dpath="image_root", within=config),
        mask_threshold=lookup(dpath="preprocess/mask_threshold", within=config),
        points_step=lookup(dpath="preprocess/points_step", within=config),
        chunk_size=lookup(dpath="preprocess/chunk_size", within=config),
    script:
        "../scripts/preprocess.py"
