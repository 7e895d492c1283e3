def retrain_inputs(wildcards):
    entry = LOSSES[wildcards.loss]
    extra = [f"{ROOT}/search/{entry['search']}/best.json"] if "search" in entry else []
    return [DATA] + extra


rule retrain:
    input:
        retrain_inputs,
    output:
        f"{ROOT}/retrain/{{loss}}.json",
    params:
        retrain=EXP.cfg["retrain"]["seeds"],
    threads: THREADS
    log:
        f"{ROOT}/logs/retrain/{{loss}}.log",
    shell:
        "lossevo retrain {OPTS} --threads {threads} -l {wildcards.loss} > {log} 2>&1"


rule stats:
    input:
        expand(f"{ROOT}/retrain/{{loss}}.json", loss=LOSSES),
    output:
        csv=f"{ROOT}/stats/welch.csv",
        md=f"{ROOT}/stats/welch.md",
    log:
        f"{ROOT}/logs/stats.log",
    shell:
        "lossevo stats {OPTS} > {log} 2>&1"
