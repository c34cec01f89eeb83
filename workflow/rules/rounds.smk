# Flexible refinement rounds: the reference of round k >= 2 made from round k-1's corrected map
# (mask and point cloud as preprocessing makes them), and the final round's files published to
# the stage paths that the report and users read.


rule round_reference:
    input:
        volume=round_reference_volume,
        template="results/{run}/preprocess/points.npz",
    output:
        reference="results/{run}/rounds/{k}/reference/reference.mrc",
        mask="results/{run}/rounds/{k}/reference/mask.mrc",
        points="results/{run}/rounds/{k}/reference/points.npz",
    log:
        "logs/{run}/rounds/{k}/round_reference.log",
    benchmark:
        "benchmarks/{run}/rounds/{k}/round_reference.tsv"
    localrule: True
    conda:
        "../../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="30m",
    params:
        z3lib=output_version("round_reference"),
    script:
        "../scripts/round_reference.py"


# gold_standard: independent — each half's reference from its own corrected half map.
use rule round_reference as round_reference_half with:
    output:
        reference="results/{run}/rounds/{k}/reference/half{half}/reference.mrc",
        mask="results/{run}/rounds/{k}/reference/half{half}/mask.mrc",
        points="results/{run}/rounds/{k}/reference/half{half}/points.npz",
    log:
        "logs/{run}/rounds/{k}/round_reference_half{half}.log",
    benchmark:
        "benchmarks/{run}/rounds/{k}/round_reference_half{half}.tsv"


# Copies (atomic, one file at a time) of the final round's files at the stage paths
# results/<run>/{train,predict,refine,zart}/ (a later `rounds` republishes).
rule publish:
    input:
        publish_inputs,
    output:
        [f"results/{{run}}/{path}" for path in PUBLISHED],
    log:
        "logs/{run}/publish.log",
    localrule: True
    conda:
        "../../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime="30m",
    params:
        z3lib=output_version("publish"),
        final_round=ROUNDS,
    script:
        "../scripts/publish.py"
