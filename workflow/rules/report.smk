rule report:
    input:
        f"{ROOT}/stats/welch.csv",
        expand(f"{ROOT}/search/{{search}}/best.json", search=SEARCHES),
    output:
        report=REPORT,
        metrics=METRICS,
    log:
        f"{ROOT}/logs/report.log",
    shell:
        "lossevo report {OPTS} > {log} 2>&1"
