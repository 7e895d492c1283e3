"""`snakemake --profile slurm` as users type it, from the repository root, and the smoke workflow run
end to end on a real single-node SLURM cluster on localhost (tests/slurm/setup.sh: Debian's slurm-wlm
and munge, fake GPUs).

The cluster test skips, with its reason in the test output, where the machine cannot run SLURM (not
root, packages not installable, a SLURM not started by the test already running). It needs no GPU:
the node advertises fake ones, jobs see CUDA_VISIBLE_DEVICES but no driver, and device "auto" picks
the CPU, so the outputs must equal a local `snakemake --cores 2` run byte for byte.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import tiny_params

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm"
VENV_BIN = Path(sys.executable).parent
#: a layer over the cluster profile for the test cluster: short status polling only
TEST_LAYER = "tests/slurm/profile"

#: one GPU each: training and the analyses that run the retrained networks over the test set
TRAINING = {"search_shard", "search_finalize", "retrain", "fgsm", "basins", "data_sweep", "lr_sweep", "taylor_ce"}
BOOKKEEPING = {"prepare", "search_step", "stats", "weights", "report"}  # none
GPU = re.compile(r"\bgpu=1\b")


def _env(path_prefix: list[Path] = ()) -> dict:
    path = os.pathsep.join([str(p) for p in path_prefix] + [str(VENV_BIN), os.environ.get("PATH", "")])
    return dict(os.environ, PATH=path, OMP_NUM_THREADS="1")


def _snakemake(*args, timeout=120, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    """`snakemake ARGS` from the repository root (or a copy of its layout), as a user types it there."""
    return subprocess.run(["timeout", "-k", "10", str(timeout), "snakemake", *args], cwd=cwd,
                          capture_output=True, text=True, env=env or _env(), timeout=timeout + 30)


def _die_with_parent():
    """preexec_fn: the child (a `timeout`) gets SIGTERM when this test's process dies, and passes it
    on to its command, killing it 20 s later at most (`timeout -k 20`): no orphaned run."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _popen(cmd, cwd, env, log) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_die_with_parent)


def _job_blocks(text: str) -> list[tuple[str, str]]:
    """(rule, resources line) of every job a dry run lists."""
    jobs, rule = [], None
    for line in text.splitlines():
        m = re.match(r"(?:local)?rule (\w+):$", line)
        if m:
            rule = m.group(1)
        elif rule and line.strip().startswith("resources:"):
            jobs.append((rule, line.strip()))
            rule = None
    return jobs


def _job_stats(text: str) -> dict[str, int]:
    """The first 'Job stats' table of a Snakemake log: {rule: count} (without the total)."""
    m = re.search(r"Job stats:\njob +count\n[- ]+\n((?:\S+ +\d+\n)+)", text)
    assert m, f"no job stats in:\n{text[-3000:]}"
    rows = dict(line.split() for line in m.group(1).splitlines())
    rows.pop("total", None)
    return {rule: int(n) for rule, n in rows.items()}


def _gpu_rules(dry_run: str) -> set[str]:
    """The rules whose jobs request a GPU in a dry run; the training rules do, bookkeeping doesn't."""
    jobs = _job_blocks(dry_run)
    gpu = {rule for rule, resources in jobs if GPU.search(resources)}
    assert TRAINING <= gpu and not BOOKKEEPING & gpu, sorted(gpu)
    assert all(GPU.search(res) for rule, res in jobs if rule in gpu), "a rule's jobs differ"
    return gpu


def _finished(text: str) -> Counter:
    return Counter(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", text))


# --- the profiles -------------------------------------------------------------------------------

def test_slurm_profile_is_found_by_name_and_not_overridden_by_the_workflow_profile(monkeypatch):
    """`--profile slurm` from the repository root finds ./slurm; the workflow profile (applied to
    every run, its keys winning) shares no key with it, so every cluster setting holds as written;
    `snakemake` alone stays local."""
    from snakemake.cli import parse_args

    monkeypatch.chdir(REPO)
    cluster = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    workflow = yaml.safe_load((REPO / "workflow" / "profiles" / "default" / "config.yaml").read_text())
    assert not set(cluster) & set(workflow), "a key in both profiles: the workflow profile's wins"
    assert not {"default-resources", "set-resources"} & set(workflow), \
        "resources in the workflow profile would replace a cluster profile's blocks wholesale"
    _, args = parse_args(["--profile", "slurm", "-n"])
    for key, value in cluster.items():
        assert getattr(args, key.replace("-", "_")) == value, key
    assert args.executor == "slurm" and args.keep_going and args.retries == 1 and args.rerun_incomplete
    _, local = parse_args(["-n"])
    assert local.executor is None and not local.keep_going and local.retries == 0
    assert isinstance(local.cores, int) and local.cores >= 1 and local.rerun_incomplete  # cores: all


def test_dry_run_through_slurm_requests_a_gpu_for_training_rules_only(tiny):
    out = _snakemake("--profile", "slurm", "-n")  # exactly as typed, the repository's params.yaml
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Using profiles slurm and workflow specific profile workflow/profiles/default" in out.stderr

    out = _snakemake("--profile", "slurm", "-n", "--configfile", str(tiny))
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    jobs = _job_blocks(text)
    stats = _job_stats(text)
    assert {rule for rule, _ in jobs} == set(stats) and len(jobs) == sum(stats.values())
    assert TRAINING | BOOKKEEPING <= set(stats)
    _gpu_rules(text)
    for rule, resources in jobs:
        if rule in TRAINING | BOOKKEEPING:  # the workflow's own needs, set in the rules
            assert re.search(r"\bruntime=\d+", resources) and "mem_mb=" in resources, (rule, resources)
        if rule in BOOKKEEPING:
            assert "gpu" not in resources, (rule, resources)


# --- the smoke workflow on a real SLURM cluster --------------------------------------------------

def smoke_params(results: Path) -> dict:
    """A trimmed tiny experiment: TaylorGLO 1 generation x 2 shards, cross-entropy and the TaylorGLO
    loss retrained over 2 seeds, every analysis on its smallest grid. (GLO runs through the same
    engine and rules; the local pipeline tests cover it.) What costs time under SLURM is the number
    of jobs and dependency levels, each level at least one status poll, not the training."""
    params = tiny_params(results, generations=1, popsize=4, shards=2)
    exp = params["experiments"]["tiny"]
    exp["search"] = {"tg": exp["search"]["tg"]}
    exp["retrain"] = {"seeds": 2, "losses": {"cross_entropy": {"kind": "cross_entropy"},
                                             "tg": {"search": "tg"}}}
    exp["evaluate"] = {"fgsm": {"epsilons": [0, 0.1]}, "basins": {"directions": 1, "points_1d": 5, "points_2d": 3},
                       "weights": {"bins": 11}, "data_sweep": {"fractions": [0.5, 1.0], "seeds": 2},
                       "lr_sweep": {"factors": [0.3, 3.0], "seeds": 2}, "taylor_ce": {"orders": [2], "seeds": 2}}
    return params


def _compared(root: Path) -> dict[str, bytes]:
    """The results compared between runs: JSON/CSV/Markdown tables, not logs, search state or the
    report (which names its results directory)."""
    exp = root / "tiny"
    files = [*exp.glob("retrain/*.json"), *exp.glob("search/*/best.json"), *exp.glob("search/*/progress.csv"),
             *exp.glob("stats/*"), *exp.glob("eval/*.json"), exp / "metrics.json", *exp.glob("plots/*.csv")]
    return {str(f.relative_to(root)): f.read_bytes() for f in files if f.is_file()}


@contextlib.contextmanager
def _cluster_lock(wait_s=600):
    """One test cluster per machine: concurrent runs of this test take turns."""
    with open("/run/lossevo-slurm.lock", "w") as fh:
        deadline = time.time() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    pytest.skip(f"another run of this test held the SLURM test cluster for {wait_s} s")
                time.sleep(2)
        yield


def _skip(capsys, reason):
    with capsys.disabled():
        print(f"\ntests/test_slurm.py: SKIPPED the SLURM cluster test: {reason}")
    pytest.skip(reason)


def _wait_for(log: Path, proc: subprocess.Popen, done, timeout_s: float, quiet_s=1.0) -> str:
    """Poll a running Snakemake's log until done(text) and then no new line for quiet_s (so that a
    kill never falls between a finished job's bookkeeping and its log line); fail (after stopping
    it) on timeout or exit."""
    deadline = time.time() + timeout_s
    last, since = None, time.time()
    while time.time() < deadline:
        text = log.read_text()
        if text != last:
            last, since = text, time.time()
        elif done(text) and time.time() - since >= quiet_s:
            return text
        if proc.poll() is not None:
            pytest.fail(f"snakemake exited ({proc.returncode}) before the kill point:\n{text[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"kill point not reached in {timeout_s} s:\n{log.read_text()[-4000:]}")


def _child(pid: int) -> int:
    """The command a `timeout` process runs."""
    (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(child)


def _rule(comment: str) -> str:
    """The rule of a job from the plugin's --comment (rule_NAME or rule_NAME_wildcards_...)."""
    return re.match(r"rule_(.+?)(?:_wildcards_|$)", comment).group(1)


def _squeue() -> list[dict]:
    """Every job the test cluster knows (MinJobAge=3600 keeps finished ones listed)."""
    out = subprocess.run(["timeout", "20", "squeue", "--states=all", "--noheader",
                          "-O", "JobID:20,Name:40,State:20,Comment:80,tres-per-job:40"],
                         capture_output=True, text=True, check=True)
    keys = ["id", "name", "state", "comment", "tres"]
    jobs = [dict(zip(keys, line.split())) for line in out.stdout.splitlines() if line.strip()]
    return sorted(jobs, key=lambda j: int(j["id"]))


#: The background run of the cluster test (:func:`start_in_background`): thread, result, error.
_BACKGROUND: dict = {}


def _cannot_run() -> str | None:
    if os.environ.get("LOSSEVO_TEST_SLURM") == "0":
        return "LOSSEVO_TEST_SLURM=0 (CI runs it)"
    if os.geteuid() != 0:
        return "not root: a SLURM cluster's daemons (slurmctld, slurmd, munged) need root"
    return None


def start_in_background() -> None:
    """Start the cluster test in a thread (tests/conftest.py calls this once the test is collected).

    The SLURM workflow is latency-bound -- each dependency level waits for at least one status poll
    of the plugin (2 s, then 10 s more per poll that finds nothing finished) -- so it runs while
    the rest of the suite uses the CPU, and the test, collected last, checks its outcome.
    """
    if _BACKGROUND:
        return
    reason = _cannot_run()
    if reason:
        _BACKGROUND["skip"] = reason
        return
    tmp = Path(tempfile.mkdtemp(prefix="lossevo-slurm-test-"))

    def work():
        try:
            _BACKGROUND["result"] = _cluster_test(tmp)
        except BaseException as exc:  # noqa: BLE001 - pytest's fail/skip too: re-raised by the test
            _BACKGROUND["error"] = exc

    _BACKGROUND.update(tmp=tmp, thread=threading.Thread(target=work, name="slurm-cluster-test", daemon=True))
    _BACKGROUND["thread"].start()


def test_smoke_workflow_through_slurm(capsys):
    """The smoke experiment through `snakemake --profile slurm` on a localhost SLURM cluster:
    a job that fails once is retried per the profile; a run stopped with SIGTERM, then one killed with
    SIGKILL (its leftover jobs scancel'ed), are each rerun with `snakemake --profile slurm` and run
    only the remaining jobs; the outputs equal a local `snakemake --cores 2` run's byte for byte; and
    every job is in SLURM's records, a GPU requested by the training jobs only."""
    start_in_background()  # a no-op when conftest started it at collection
    if "skip" in _BACKGROUND:
        _skip(capsys, _BACKGROUND["skip"])
    _BACKGROUND["thread"].join(timeout=1800)
    assert not _BACKGROUND["thread"].is_alive(), "the SLURM cluster test did not finish in 30 min"
    if "error" in _BACKGROUND:
        error = _BACKGROUND["error"]
        if isinstance(error, pytest.skip.Exception):
            _skip(capsys, str(error))
        raise error
    with capsys.disabled():
        print(f"\ntests/test_slurm.py: {_BACKGROUND['result']}")
    shutil.rmtree(_BACKGROUND["tmp"], ignore_errors=True)


def _cluster_test(tmp: Path) -> str:
    """Stand the cluster up, run the smoke workflow through it, stop it; a one-line timing summary."""
    t0 = time.time()
    with _cluster_lock():
        up = subprocess.run(["timeout", "-k", "10", "900", str(CLUSTER / "setup.sh")],
                            capture_output=True, text=True, timeout=960)
        if up.returncode == 77:
            pytest.skip((up.stderr.strip().splitlines() or ["(no reason given)"])[-1].removeprefix("SKIP: "))
        try:
            assert up.returncode == 0, f"test cluster did not come up:\n{up.stdout}\n{up.stderr[-4000:]}"
            t_up = time.time()
            timings = _run_smoke(tmp)
        finally:
            subprocess.run(["timeout", "-k", "10", "120", str(CLUSTER / "stop.sh")], timeout=150)
    return (f"SLURM cluster test: {time.time() - t0:.0f} s in all, alongside the rest of the suite (cluster "
            f"up {t_up - t0:.0f} s; " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")


def _layout(tmp: Path) -> Path:
    """A directory laid out like the repository root (its slurm/, workflow/ and tests/), from which
    the SLURM runs are typed as from the root: `snakemake --profile slurm` finds ./slurm and
    ./workflow/Snakefile there as in the root, and the runs' .snakemake (locks, incomplete markers,
    the --unlock after the SIGKILL) is their own, apart from the suite's other Snakemake runs."""
    root = tmp / "root"
    root.mkdir()
    for name in ("slurm", "workflow", "tests"):
        (root / name).symlink_to(REPO / name)
    return root


def _run_smoke(tmp: Path) -> dict[str, float]:
    local_yaml, slurm_yaml = tmp / "local.yaml", tmp / "slurm.yaml"
    local_yaml.write_text(yaml.safe_dump(smoke_params(tmp / "local")))
    slurm_yaml.write_text(yaml.safe_dump(smoke_params(tmp / "slurm")))
    # The local run of the same experiment, for the comparison at the end: alongside the SLURM runs at
    # the lowest CPU priority (it fills the CPU that status polling leaves idle), from its own
    # working directory (its own .snakemake, untouched by the --unlock below).
    (tmp / "localrun").mkdir()
    with open(tmp / "local_run.log", "w") as log:
        local = _popen(["nice", "-n", "19", "timeout", "-k", "20", "900", "snakemake", "-s",
                        str(REPO / "workflow" / "Snakefile"), "--cores", "2", "--configfile", str(local_yaml)],
                       tmp / "localrun", _env(), log)
    try:
        timings = _slurm_runs(tmp, slurm_yaml)
        rc = local.wait(timeout=960)
    finally:
        if local.poll() is None:
            os.killpg(local.pid, signal.SIGKILL)
    text = (tmp / "local_run.log").read_text()
    assert rc == 0, text[-4000:]
    h, m, s = re.search(r"Elapsed time: (\d+):(\d+):([\d.]+)", text).groups()
    timings["local --cores 2 run (alongside, niced)"] = 3600 * int(h) + 60 * int(m) + float(s)

    # The same smoke experiment run locally gives the same results, byte for byte.
    a, b = _compared(tmp / "slurm"), _compared(tmp / "local")
    assert len(a) >= 10 and a.keys() == b.keys(), (sorted(a), sorted(b))
    assert [f for f in a if a[f] != b[f]] == []
    return timings


def _slurm_runs(tmp: Path, slurm_yaml: Path) -> dict[str, float]:
    # A test-only `lossevo` first on PATH (exported into the jobs): the first cross-entropy retraining
    # fails, as on a flaky node; everything else, and the retry, runs the real one.
    flaky = tmp / "bin" / "lossevo"
    flaky.parent.mkdir()
    flaky.write_text(f"""#!/bin/bash
if [ "$1" = retrain ] && [[ " $* " == *" -l cross_entropy "* ]] && mkdir {tmp}/failed-once 2>/dev/null; then
  echo "test: failing this job once on purpose" >&2; exit 3
fi
exec {VENV_BIN / 'lossevo'} "$@"
""")
    flaky.chmod(0o755)
    env = _env([flaky.parent])
    cmd = ["timeout", "-k", "20", "600", "snakemake", "--profile", "slurm", "--profile", TEST_LAYER,
           "--configfile", str(slurm_yaml)]

    procs = []
    root = _layout(tmp)

    def start(n):
        log = tmp / f"slurm_run{n}.log"
        with open(log, "w") as fh:
            procs.append(_popen(cmd, root, env, fh))
        return procs[-1], log

    try:
        return _kill_and_rerun(root, slurm_yaml, start)
    finally:
        for proc in procs:  # on a failure: no snakemake outlives the test (stop.sh cancels the jobs)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def _kill_and_rerun(root: Path, slurm_yaml: Path, start) -> dict[str, float]:

    t = time.time()
    dry = _snakemake("--profile", "slurm", "-n", "--configfile", str(slurm_yaml), cwd=root).stdout
    full, gpu_rules = _job_stats(dry), _gpu_rules(dry)
    total = sum(full.values())

    # Run 1: stopped with SIGTERM once the failed job was retried and some jobs finished. Snakemake
    # then waits for its running jobs and exits.
    proc, log1 = start(1)
    text1 = _wait_for(log1, proc, lambda s: "Trying to restart job" in s and _finished(s)["retrain"] >= 1
                      and sum(_finished(s).values()) >= 5, 300)
    os.kill(_child(proc.pid), signal.SIGTERM)  # snakemake itself: `timeout` would SIGKILL it 20 s later
    proc.wait(timeout=180)
    text1 = log1.read_text()
    assert (root.parent / "failed-once").is_dir() and "Error in rule retrain" in text1
    assert _job_stats(text1) == full
    done = _finished(text1)
    assert 0 < sum(done.values()) < total

    # Run 2, as typed: only the remaining jobs. Killed with SIGKILL after a few more finished.
    proc, log2 = start(2)
    text2 = _wait_for(log2, proc, lambda s: sum(_finished(s).values()) >= 3, 300)
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and its `timeout`: no chance to clean up
    proc.wait(timeout=30)
    text2 = log2.read_text()
    assert _job_stats(text2) == {r: n for r, n in (Counter(full) - done).items()}
    run2 = re.search(r"SLURM run ID: (\S+)", text2).group(1)
    subprocess.run(["timeout", "20", "scancel", "--name", run2], check=True)  # its leftover jobs
    # Jobs that completed in SLURM after run 2's last status check are complete (the job itself
    # records its outputs); those still running were cancelled and are incomplete.
    deadline = time.time() + 60
    while any(j["state"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING") for j in _squeue()
              if j["name"] == run2) and time.time() < deadline:
        time.sleep(0.5)
    # Jobs of run 2 that ended in SLURM after its last status check: COMPLETED ones are complete (the
    # job records its own outputs); CANCELLED ones may have finished their work before the scancel.
    late = Counter(_rule(j["comment"]) for j in _squeue() if j["name"] == run2
                   and j["state"] in ("COMPLETED", "CANCELLED")) - _finished(text2)
    done += _finished(text2)
    unlock = _snakemake("--profile", "slurm", "--configfile", str(slurm_yaml), "--unlock", cwd=root)
    assert unlock.returncode == 0, unlock.stderr[-2000:]

    # Run 3, as typed: the remaining jobs (those cancelled when run 2 was killed among them), to the end.
    # Never a job a run's log says finished; every job not known complete.
    proc, log3 = start(3)
    assert proc.wait(timeout=660) == 0, log3.read_text()[-5000:]
    text3 = log3.read_text()
    upper = Counter(full) - done
    ran = Counter(_job_stats(text3))
    assert ran <= upper and upper - late <= ran, (dict(ran), dict(upper), dict(late))
    assert "100%) done" in text3
    t_slurm = time.time() - t

    # SLURM's records: every job of the workflow completed, the GPU requested by training jobs only,
    # the deliberately failed job FAILED once then COMPLETED.
    runs = {re.search(r"SLURM run ID: (\S+)", s).group(1) for s in (text1, text2, text3)}
    jobs = [j for j in _squeue() if j["name"] in runs]
    completed = {j["comment"] for j in jobs if j["state"] == "COMPLETED"}
    cancelled = {j["comment"] for j in jobs if j["state"] == "CANCELLED"} - completed
    assert total - full.get("all", 0) - len(cancelled) <= len(completed) <= total - full.get("all", 0), \
        (sorted(completed), sorted(cancelled))
    for j in jobs:
        assert (j["tres"] == "gres:gpu:1") == (_rule(j["comment"]) in gpu_rules), j
    ce = [j["state"] for j in jobs if j["comment"] == "rule_retrain_wildcards_cross_entropy"]
    assert ce == ["FAILED", "COMPLETED"], ce  # retries: 1
    return {"SLURM workflow (3 runs)": t_slurm}
