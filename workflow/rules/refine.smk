# Classical per-particle refinement of the predicted fields against the round's reference,
# scattered over particle chunks and gathered back in STAR order, once per refinement round {k},
# starting from the poses of the round's predict STAR (the network's pose corrections).
# In landscape mode the landscape is first refitted to all particles (rule refine_landscape).
# GPU rules: they run on the CPU when no GPU is usable (the log says so).


rule refine_landscape:
    input:
        particles="results/{run}/preprocess/particles.star",
        stack="results/{run}/preprocess/particles.mrcs",
        points=round_network_points,
        prior="results/{run}/rounds/{k}/predict/coefficients.npy",
        poses="results/{run}/rounds/{k}/predict/particles.star",
    output:
        landscapes=LANDSCAPE_OUTPUTS,
    log:
        "logs/{run}/rounds/{k}/refine_landscape.log",
    benchmark:
        "benchmarks/{run}/rounds/{k}/refine_landscape.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime="4h",
    params:
        z3lib=output_version("refine_landscape"),
        zernike=lookup(dpath="zernike", within=config),
        refine=lookup(dpath="refine", within=config),
        roughness=lookup(dpath="train/roughness", within=config),
        gold_standard=lookup(dpath="gold_standard", within=config),
        seed=lookup(dpath="seed", within=config),
        pixel_size=lookup(dpath="pixel_size", within=config),
        image_root=lookup(dpath="image_root", within=config),
    script:
        "../scripts/refine_landscape.py"


rule refine_chunk:
    input:
        particles="results/{run}/preprocess/particles.star",
        stack="results/{run}/preprocess/particles.mrcs",
        points=round_network_points,
        prior="results/{run}/rounds/{k}/predict/coefficients.npy",
        # the latest poses and CTF: the network's pose corrections (train.refine_pose)
        poses="results/{run}/rounds/{k}/predict/particles.star",
        landscapes=round_landscapes,
    output:
        chunk=temp("results/{run}/rounds/{k}/refine/chunks/{scatteritem}.npz"),
    log:
        "logs/{run}/rounds/{k}/refine_chunk/{scatteritem}.log",
    benchmark:
        "benchmarks/{run}/rounds/{k}/refine_chunk/{scatteritem}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime="4h",
    params:
        z3lib=output_version("refine_chunk"),
        zernike=lookup(dpath="zernike", within=config),
        refine=lookup(dpath="refine", within=config),
        roughness=lookup(dpath="train/roughness", within=config),
        gold_standard=lookup(dpath="gold_standard", within=config),
        seed=lookup(dpath="seed", within=config),
        pixel_size=lookup(dpath="pixel_size", within=config),
        image_root=lookup(dpath="image_root", within=config),
        progress=lambda wildcards: round_path(
            wildcards, wildcards.k, "refine", f"chunks/{wildcards.scatteritem}.progress"
        ),
    script:
        "../scripts/refine_chunk.py"


rule refine:
    input:
        chunks=gather.refine("results/{{run}}/rounds/{{k}}/refine/chunks/{scatteritem}.npz"),
        original=original_particles,
    output:
        # STAGE_OUTPUTS["refine"] (common.smk), by key
        **declared_outputs("refine", "results/{run}/rounds/{k}/refine"),
    log:
        "logs/{run}/rounds/{k}/refine.log",
    benchmark:
        "benchmarks/{run}/rounds/{k}/refine.tsv"
    localrule: True
    conda:
        "../../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="30m",
    params:
        z3lib=output_version("refine"),
        zernike=lookup(dpath="zernike", within=config),
        pixel_size=lookup(dpath="pixel_size", within=config),
        image_root=lookup(dpath="image_root", within=config),
    script:
        "../scripts/refine.py"
