rule report:
    input:
        f"{ROOT}/stats/welch.csv",
        expand(f"{ROOT}/search/{{search}}/best.json", search=SEARCHES),
        expand(f"{ROOT}/eval/{{name}}.json", name=["fgsm", "basins", "weights"]),
        expand(f"{ROOT}/eval/{{name}}.json", name=["data_sweep", "lr_sweep", "taylor_ce"]),
    output:
        report=REPORT,
        metrics=METRICS,
        plots=expand(f"{ROOT}/plots/{{name}}.csv", name=["search_progress", "retrain_accuracy", "training_curves"]),
    params:
        opts=OPTS,
    resources:
        runtime=10,
        mem_mb=4000,
    log:
        f"{ROOT}/logs/report.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        "lossevo report {params.opts} > {log} 2>&1"
