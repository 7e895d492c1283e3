rule prepare:
    output:
        DATA,
    params:
        opts=OPTS,
        data=EXP.cfg["data"],
    resources:
        runtime=30,
        mem_mb=8000,
    log:
        f"{ROOT}/logs/prepare.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        "lossevo prepare {params.opts} > {log} 2>&1"
