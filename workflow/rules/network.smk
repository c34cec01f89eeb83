# Zernike3Deep: train the network on the preprocessed particles, then predict every particle's
# Zernike3D coefficients. GPU rules: they run on the CPU when no GPU is usable (the log says so).


rule train:
    input:
        particles="results/{run}/preprocess/particles.star",
        stack="results/{run}/preprocess/particles.mrcs",
        points="results/{run}/preprocess/points.npz",
    output:
        model="results/{run}/train/model.pt",
        history="results/{run}/train/history.tsv",
    log:
        "logs/{run}/train.log",
    benchmark:
        "benchmarks/{run}/train.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 8
    resources:
        gpu=1,
        mem_mb=16000,
        runtime="8h",
    params:
        z3lib=Z3LIB_VERSION,
        zernike=lookup(dpath="zernike", within=config),
        train=lookup(dpath="train", within=config),
        seed=lookup(dpath="seed", within=config),
        checkpoint_dir=lambda wildcards: f"results/{wildcards.run}/train/checkpoint",
    script:
        "../scripts/train.py"


rule predict:
    input:
        model="results/{run}/train/model.pt",
        particles="results/{run}/preprocess/particles.star",
        stack="results/{run}/preprocess/particles.mrcs",
        original=original_particles,
    output:
        particles="results/{run}/predict/particles.star",
        coefficients="results/{run}/predict/coefficients.npy",
    log:
        "logs/{run}/predict.log",
    benchmark:
        "benchmarks/{run}/predict.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime="2h",
    params:
        z3lib=Z3LIB_VERSION,
        batch_size=lookup(dpath="predict/batch_size", within=config),
        pixel_size=lookup(dpath="pixel_size", within=config),
        image_root=lookup(dpath="image_root", within=config),
    script:
        "../scripts/predict.py"
