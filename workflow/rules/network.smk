# Zernike3Deep: train the network on the preprocessed particles, then predict every particle's
# Zernike3D coefficients, once per refinement round {k} (round k >= 2 fine-tunes round k-1's
# network, and trains and predicts with the latest poses and CTF: round k-1's refine STAR).
# GPU rules: they run on the CPU when no GPU is usable (the log says so).


rule train:
    input:
        unpack(train_inputs),
    output:
        # STAGE_OUTPUTS["train"] (common.smk), by key
        **declared_outputs("train", "results/{run}/rounds/{k}/train"),
    log:
        "logs/{run}/rounds/{k}/train.log",
    benchmark:
        "benchmarks/{run}/rounds/{k}/train.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 8
    resources:
        gpu=TRAIN_PROCESSES,  # train.processes > 1: one torchrun rank per GPU
        mem_mb=16000,
        runtime="8h",
    params:
        z3lib=output_version("train"),
        zernike=lookup(dpath="zernike", within=config),
        train=lookup(dpath="train", within=config),
        seed=lookup(dpath="seed", within=config),
        pixel_size=lookup(dpath="pixel_size", within=config),
        image_root=lookup(dpath="image_root", within=config),
        half=lambda wildcards: train_params(wildcards)["half"],
        checkpoint_dir=lambda wildcards: train_params(wildcards)["checkpoint_dir"],
    script:
        "../scripts/train.py"


# gold_standard: independent — one network per half set, trained on that half's particles only.
use rule train as train_half with:
    output:
        **declared_outputs("train", "results/{run}/rounds/{k}/train/half{half}"),
    log:
        "logs/{run}/rounds/{k}/train_half{half}.log",
    benchmark:
        "benchmarks/{run}/rounds/{k}/train_half{half}.tsv"


rule predict:
    input:
        unpack(round_poses),  # round k >= 2: the latest poses and CTF
        models=round_models,
        particles="results/{run}/preprocess/particles.star",
        stack="results/{run}/preprocess/particles.mrcs",
        original=original_particles,
    output:
        # STAGE_OUTPUTS["predict"] (common.smk), by key
        **declared_outputs("predict", "results/{run}/rounds/{k}/predict"),
    log:
        "logs/{run}/rounds/{k}/predict.log",
    benchmark:
        "benchmarks/{run}/rounds/{k}/predict.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime="2h",
    params:
        z3lib=output_version("predict"),
        batch_size=lookup(dpath="predict/batch_size", within=config),
        pixel_size=lookup(dpath="pixel_size", within=config),
        image_root=lookup(dpath="image_root", within=config),
    script:
        "../scripts/predict.py"
