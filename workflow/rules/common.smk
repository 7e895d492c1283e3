# Shared definitions: the validated experiment and the paths every rule uses.
import shlex
import sys

from lossevo import config as lossevo_config
from lossevo.errors import LossevoError
from lossevo.search import state as search_state
from lossevo.search.engine import fingerprint, generations

# One parameter source. The stages (`lossevo ... --params FILE -e NAME`) read the parameter file
# themselves, so the workflow reads and validates that same file, through lossevo (YAML 1.2, as
# DVC reads it; Snakemake's own `configfile:` reading is PyYAML's YAML 1.1, where `1e-3` is a
# string): params.yaml, or the file given with `--configfile`. Of Snakemake's `--config KEY=VALUE`
# only `experiment` is accepted, validated like the file and passed to every stage as `-e NAME`;
# any other key is refused with a one-line error rather than silently ignored, because the stages
# would not see it (they re-read the file). Snakemake's `config` is then replaced by the
# validated parameters, so a rule that reads `config` sees what the stages see.
try:
    if len(workflow.overwrite_configfiles) > 1:
        raise LossevoError(
            "snakemake --configfile: give one parameter file (the stages read one --params file), got "
            + ", ".join(str(f) for f in workflow.overwrite_configfiles)
        )
    PARAMS_FILE = str((workflow.overwrite_configfiles or ["params.yaml"])[-1])
    RAW = lossevo_config.read_params(PARAMS_FILE)
    PARAMS = lossevo_config.validate(RAW, PARAMS_FILE)  # errors in the file name the file
    CLI_CONFIG = dict(workflow.config_settings.config)
    if CLI_CONFIG:
        PARAMS = lossevo_config.with_overrides(RAW, CLI_CONFIG, "snakemake --config")
    EXP = lossevo_config.experiment(PARAMS)
except LossevoError as exc:
    sys.exit(f"lossevo: error: {exc}")
config.clear()
config.update(PARAMS)

ROOT = str(EXP.root)
NAME = EXP.name
THREADS = EXP.threads
SEARCHES = EXP.cfg["search"]
LOSSES = EXP.cfg["retrain"]["losses"]
DATA = f"{ROOT}/data.pt"
REPORT = f"{ROOT}/report/report.md"
METRICS = f"{ROOT}/metrics.json"
OPTS = f"--params {shlex.quote(PARAMS_FILE)} -e {NAME}"


wildcard_constraints:
    search="|".join(SEARCHES) or "NO_SEARCH",
    loss="|".join(LOSSES),
    gen=r"\d{3}",
    shard=r"\d{2}",


def search_file(search, g, name):
    return f"{ROOT}/search/{search}/gen_{g:03d}/{name}"


def shard_files(search, g):
    shards = SEARCHES[search]["shards"]
    return [search_file(search, g, f"shard_{s:02d}.json") for s in range(shards)]


def step_inputs(wildcards):
    g = int(wildcards.gen)
    if g == 0:
        return [DATA]
    return [search_file(wildcards.search, g - 1, "candidates.json")] + shard_files(
        wildcards.search, g - 1
    )


def retrain_inputs(wildcards):
    entry = LOSSES[wildcards.loss]
    extra = [f"{ROOT}/search/{entry['search']}/best.json"] if "search" in entry else []
    return [DATA] + extra
