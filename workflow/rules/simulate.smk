# The embedded demo: a ground-truth dataset simulated from two atomic models (only requested
# when config `particles` is null).


rule simulate:
    input:
        start_model=lookup(dpath="demo/start_model", within=config),
        end_model=lookup(dpath="demo/end_model", within=config),
    output:
        # STAGE_OUTPUTS["simulate"] (common.smk), by key
        **declared_outputs("simulate", "results/{run}/simulate"),
    log:
        "logs/{run}/simulate.log",
    benchmark:
        "benchmarks/{run}/simulate.tsv"
    conda:
        "../../envs/base.yaml"
    threads: 4
    resources:
        mem_mb=4000,
        runtime="30m",
    params:
        z3lib=output_version("simulate"),
        n_particles=lookup(dpath="demo/n_particles", within=config),
        box=lookup(dpath="demo/box", within=config),
        pixel_size=lookup(dpath="demo/pixel_size", within=config),
        resolution=lookup(dpath="demo/resolution", within=config),
        snr=lookup(dpath="demo/snr", within=config),
        reference_t=lookup(dpath="demo/reference_t", within=config),
        seed=lookup(dpath="seed", within=config),
    script:
        "../scripts/simulate.py"
