# Shared definitions: the validated experiment and the paths every rule uses.
import sys

from lossevo import config as lossevo_config
from lossevo.errors import LossevoError
from lossevo.search import state as search_state
from lossevo.search.engine import fingerprint, generations

# The stages read the parameter file themselves, so the workflow validates that same file:
# params.yaml, or the last --configfile given (e.g. `--configfile other.yaml`).
PARAMS_FILE = (workflow.overwrite_configfiles or ["params.yaml"])[-1]
try:
    PARAMS = lossevo_config.load_params(PARAMS_FILE)
    EXP = lossevo_config.experiment(PARAMS)
except LossevoError as exc:
    sys.exit(f"lossevo: error: {exc}")

ROOT = str(EXP.root)
NAME = EXP.name
THREADS = EXP.threads
SEARCHES = EXP.cfg["search"]
LOSSES = EXP.cfg["retrain"]["losses"]
DATA = f"{ROOT}/data.pt"
REPORT = f"{ROOT}/report/report.md"
METRICS = f"{ROOT}/metrics.json"
OPTS = f"--params {PARAMS_FILE} -e {NAME}"


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
