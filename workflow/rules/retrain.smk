rule retrain:
    input:
        retrain_inputs,
    output:
        f"{ROOT}/retrain/{{loss}}.json",
    params:
        opts=OPTS,
        retrain=EXP.cfg["retrain"],
    threads: THREADS
    resources:
        gpu=1,
        runtime=720,
        mem_mb=8000,
    log:
        f"{ROOT}/logs/retrain/{{loss}}.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        "lossevo retrain {params.opts} --threads {threads} -l {wildcards.loss} > {log} 2>&1"


rule stats:
    input:
        expand(f"{ROOT}/retrain/{{loss}}.json", loss=LOSSES),
    output:
        csv=f"{ROOT}/stats/welch.csv",
        md=f"{ROOT}/stats/welch.md",
    params:
        opts=OPTS,
    resources:
        runtime=10,
        mem_mb=2000,
    log:
        f"{ROOT}/logs/stats.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        "lossevo stats {params.opts} > {log} 2>&1"
