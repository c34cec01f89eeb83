# Classical per-particle refinement of the predicted fields, scattered over particle chunks and
# gathered back in STAR order. GPU rule: runs on the CPU when no GPU is usable (the log says so).


rule refine_chunk:
    input:
        particles="results/{run}/preprocess/particles.star",
        stack="results/{run}/preprocess/particles.mrcs",
        points="results/{run}/preprocess/points.npz",
        prior="results/{run}/predict/coefficients.npy",
    output:
        chunk=temp("results/{run}/refine/chunks/{scatteritem}.npz"),
    log:
        "logs/{run}/refine_chunk/{scatteritem}.log",
    benchmark:
        "benchmarks/{run}/refine_chunk/{scatteritem}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime="4h",
    params:
        z3lib=Z3LIB_VERSION,
        zernike=lookup(dpath="zernike", within=config),
        refine=lookup(dpath="refine", within=config),
        progress=lambda wildcards: f"results/{wildcards.run}/refine/chunks/{wildcards.scatteritem}.progress.npz",
    script:
        "../scripts/refine_chunk.py"


rule refine:
    input:
        chunks=gather.refine("results/{{run}}/refine/chunks/{scatteritem}.npz"),
        original=original_particles,
    output:
        particles="results/{run}/refine/particles.star",
        coefficients="results/{run}/refine/coefficients.npy",
    log:
        "logs/{run}/refine.log",
    benchmark:
        "benchmarks/{run}/refine.tsv"
    localrule: True
    conda:
        "../../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="30m",
    params:
        z3lib=Z3LIB_VERSION,
        zernike=lookup(dpath="zernike", within=config),
        pixel_size=lookup(dpath="pixel_size", within=config),
        image_root=lookup(dpath="image_root", within=config),
    script:
        "../scripts/refine.py"
