# Analyses of the retrained networks: one rule per analysis, each with its own parameters.


def evaluate_inputs(wildcards):
    return [DATA] + expand(f"{ROOT}/retrain/{{loss}}.json", loss=LOSSES)


rule fgsm:
    input:
        evaluate_inputs,
    output:
        f"{ROOT}/eval/fgsm.json",
    params:
        opts=OPTS,
        settings=EXP.cfg["evaluate"]["fgsm"],
    threads: THREADS
    resources:
        gpu=1,  # forward and input-gradient passes over the test set, every seed and loss
        runtime=240,
        mem_mb=8000,
    log:
        f"{ROOT}/logs/eval/fgsm.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        "lossevo fgsm {params.opts} --threads {threads} > {log} 2>&1"


rule basins:
    input:
        evaluate_inputs,
    output:
        f"{ROOT}/eval/basins.json",
    params:
        opts=OPTS,
        settings=EXP.cfg["evaluate"]["basins"],
    threads: THREADS
    resources:
        gpu=1,  # test accuracy at every grid point of every seed and loss
        runtime=480,
        mem_mb=8000,
    log:
        f"{ROOT}/logs/eval/basins.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        "lossevo basins {params.opts} --threads {threads} > {log} 2>&1"


rule weights:
    input:
        evaluate_inputs,
    output:
        f"{ROOT}/eval/weights.json",
    params:
        opts=OPTS,
        settings=EXP.cfg["evaluate"]["weights"],
    threads: THREADS
    resources:
        runtime=30,  # histograms and fits of the kept weights: no GPU
        mem_mb=4000,
    log:
        f"{ROOT}/logs/eval/weights.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        "lossevo weights {params.opts} --threads {threads} > {log} 2>&1"


rule data_sweep:
    input:
        evaluate_inputs,
    output:
        f"{ROOT}/eval/data_sweep.json",
    params:
        opts=OPTS,
        settings=EXP.cfg["evaluate"]["data_sweep"],
        # The sweeps train with the retraining recipe: a changed recipe reruns them.
        recipe=[EXP.cfg["model"], EXP.cfg["training"]],
    threads: THREADS
    resources:
        gpu=1,
        runtime=720,
        mem_mb=8000,
    log:
        f"{ROOT}/logs/eval/data_sweep.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        # One worker: Snakemake runs the rules side by side (DVC's sequential stages use all cores).
        "lossevo data-sweep {params.opts} --threads {threads} --workers 1 > {log} 2>&1"


rule lr_sweep:
    input:
        evaluate_inputs,
    output:
        f"{ROOT}/eval/lr_sweep.json",
    params:
        opts=OPTS,
        settings=EXP.cfg["evaluate"]["lr_sweep"],
        # The sweeps train with the retraining recipe: a changed recipe reruns them.
        recipe=[EXP.cfg["model"], EXP.cfg["training"]],
    threads: THREADS
    resources:
        gpu=1,
        runtime=720,
        mem_mb=8000,
    log:
        f"{ROOT}/logs/eval/lr_sweep.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        # One worker: Snakemake runs the rules side by side (DVC's sequential stages use all cores).
        "lossevo lr-sweep {params.opts} --threads {threads} --workers 1 > {log} 2>&1"


rule taylor_ce:
    input:
        evaluate_inputs,
    output:
        f"{ROOT}/eval/taylor_ce.json",
    params:
        opts=OPTS,
        settings=EXP.cfg["evaluate"]["taylor_ce"],
        # The sweeps train with the retraining recipe: a changed recipe reruns them.
        recipe=[EXP.cfg["model"], EXP.cfg["training"]],
    threads: THREADS
    resources:
        gpu=1,
        runtime=720,
        mem_mb=8000,
    log:
        f"{ROOT}/logs/eval/taylor_ce.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        # One worker: Snakemake runs the rules side by side (DVC's sequential stages use all cores).
        "lossevo taylor-ce {params.opts} --threads {threads} --workers 1 > {log} 2>&1"
