rule prepare:
    output:
        DATA,
    params:
        data=EXP.cfg["data"],
    log:
        f"{ROOT}/logs/prepare.log",
    shell:
        "lossevo prepare {OPTS} > {log} 2>&1"
