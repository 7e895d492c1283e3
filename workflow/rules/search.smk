# A search unrolled: step g (tell g-1, ask g) -> shards of g in parallel -> step g+1 ... -> finalize.


rule search_step:
    input:
        step_inputs,
    output:
        candidates=f"{ROOT}/search/{{search}}/gen_{{gen}}/candidates.json",
        optimizer=f"{ROOT}/search/{{search}}/gen_{{gen}}/optimizer.pkl",
    params:
        opts=OPTS,
        digest=lambda wc: fingerprint(EXP, wc.search)["digest"],
        g=lambda wc: int(wc.gen),
    resources:
        runtime=10,
        mem_mb=2000,
    log:
        f"{ROOT}/logs/search/{{search}}/step_{{gen}}.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        "lossevo search-step {params.opts} -s {wildcards.search} -g {params.g} > {log} 2>&1"


rule search_shard:
    input:
        f"{ROOT}/search/{{search}}/gen_{{gen}}/candidates.json",
    output:
        f"{ROOT}/search/{{search}}/gen_{{gen}}/shard_{{shard}}.json",
    params:
        opts=OPTS,
        g=lambda wc: int(wc.gen),
        s=lambda wc: int(wc.shard),
    threads: THREADS
    resources:
        gpu=1,
        runtime=240,
        mem_mb=8000,
    log:
        f"{ROOT}/logs/search/{{search}}/shard_{{gen}}_{{shard}}.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        "lossevo search-shard {params.opts} --threads {threads} -s {wildcards.search} -g {params.g} "
        "--shard {params.s} > {log} 2>&1"


rule search_finalize:
    input:
        lambda wc: [
            search_file(wc.search, generations(SEARCHES[wc.search]) - 1, "candidates.json")
        ]
        + shard_files(wc.search, generations(SEARCHES[wc.search]) - 1),
    output:
        best=f"{ROOT}/search/{{search}}/best.json",
        progress=f"{ROOT}/search/{{search}}/progress.csv",
    threads: THREADS
    params:
        opts=OPTS,
    resources:
        gpu=1,
        runtime=480,
        mem_mb=8000,
    log:
        f"{ROOT}/logs/search/{{search}}/finalize.log",
    conda:
        "../envs/lossevo.yaml"
    shell:
        "lossevo search-finalize {params.opts} --threads {threads} -s {wildcards.search} > {log} 2>&1"
