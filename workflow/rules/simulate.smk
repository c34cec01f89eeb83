# The embedded demo: a ground-truth dataset simulated from two atomic models (only requested
# when config `particles` is null).


rule simulate:
    input:
        start_model=lookup(dpath="demo/start_model", within=config),
        end_model=lookup(dpath="demo/end_model", within=config),
    output:
        particles="results/{run}/simulate/particles.star",
        stack="results/{run}/simulate/particles.mrcs",
        ground_truth="results/{run}/simulate/ground_truth.tsv",
        motion="results/{run}/simulate/motion.npz",
        reference="results/{run}/simulate/reference.mrc",
        mask="results/{run}/simulate/mask.mrc",
        truth_reference="results/{run}/simulate/truth_reference.mrc",
        state_start="results/{run}/simulate/state_start.mrc",
        state_end="results/{run}/simulate/state_end.mrc",
        reference_model="results/{run}/simulate/reference_model.pdb",
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
        z3lib=Z3LIB_VERSION,
        n_particles=lookup(dpath="demo/n_particles", within=config),
        box=lookup(dpath="demo/box", within=config),
        pixel_size=lookup(dpath="demo/pixel_size", within=config),
        resolution=lookup(dpath="demo/resolution", within=config),
        snr=lookup(dpath="demo/snr", within=config),
        reference_t=lookup(dpath="demo/reference_t", within=config),
        seed=lookup(dpath="seed", within=config),
    script:
        "../scripts/simulate.py"
