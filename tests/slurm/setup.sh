#!/bin/bash
# Stand up a single-node SLURM cluster on localhost for tests/test_slurm.py (Debian's slurm-wlm and
# munge; no systemd, no slurmdbd). It writes /etc/slurm/slurm.conf and gres.conf (marked as its own:
# the plugin's job step drops SLURM_CONF from the inner srun's environment, so the config must be at
# the default place; a config it did not write is never overwritten), and under $STATE (default
# /run/lossevo-slurm) the spool and state dirs, logs, and `pids` -- the daemons it started, which
# stop.sh stops by PID.
#   FAKE_GPUS=N (default 2): the node advertises N "gpu" GRES backed by /dev/null-like character
#   devices, so that sbatch --gpus=1 is accepted on a GPU-less machine (jobs see CUDA_VISIBLE_DEVICES
#   but no driver, and lossevo's device "auto" picks the CPU).
# Exit status 77: this machine cannot run the cluster (not root, packages not installable, a SLURM
# not started by us already running); the reason is the last line on stderr.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${STATE:-/run/lossevo-slurm}
FAKE_GPUS=${FAKE_GPUS:-2}
skip() { echo "SKIP: $*" >&2; exit 77; }

[ "$(id -u)" = 0 ] || skip "not root (a SLURM cluster's daemons need root)"
"$HERE/stop.sh"   # idempotent: stop what a previous run left (by its pids file)

# A SLURM that this script did not start: leave it alone.
for p in /proc/[0-9]*; do
  case "$(cat "$p/comm" 2>/dev/null)" in
    slurmctld|slurmd|slurmdbd) skip "a $(cat "$p/comm") not started by this test is running (pid ${p#/proc/}); not touching it";;
  esac
done

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq >/dev/null 2>&1 || skip "apt-get update failed (no package access)"
  timeout 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
    || skip "apt-get install slurm-wlm munge failed (no package access)"
fi   # Debian's postinst starts no service here (no systemd; policy-rc.d)
command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
  || skip "slurmctld/slurmd/munged not found after installing slurm-wlm munge"

MARK="# written by lossevo tests/slurm/setup.sh"
for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
  [ ! -e "$f" ] || case "$(head -1 "$f")" in "$MARK"*) ;;
    *) skip "$f exists and was not written by this test; not touching it";; esac
done
HOST=$(hostname -s)
NCPU=$(nproc)
MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) - 1024 ))   # MB, must be <= what slurmd sees
[ "$MEM" -ge 8000 ] || skip "${MEM} MB of memory for jobs: the workflow's training rules request 8000 MB each"
rm -rf "$STATE"
install -d -m 0755 "$STATE"
install -d -o slurm -g slurm "$STATE/ctld" "$STATE/log"
install -d "$STATE/spool"
: > "$STATE/pids"

# --- munge: use one that already answers, else start ours (the package made /etc/munge/munge.key) ---
if ! { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }; then
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --force   # daemonizes; pid in /run/munge/munged.pid
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  echo "munged $(cat /run/munge/munged.pid)" >> "$STATE/pids"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null || { echo "munge does not work" >&2; exit 1; }

# --- fake GPUs: gres/gpu needs File= to name character devices (these are /dev/null's 1:3) ---
GRES_TYPES=""; GRES_NODE=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  for i in $(seq 0 $((FAKE_GPUS - 1))); do
    mknod -m 666 "$STATE/gpu$i" c 1 3 2>/dev/null || skip "cannot create the fake GPU devices (mknod)"
  done
  GRES_TYPES="GresTypes=gpu"; GRES_NODE="Gres=gpu:${FAKE_GPUS}"
  printf '%s\nNodeName=%s Name=gpu File=%s/gpu[0-%d]\n' "$MARK" "$HOST" "$STATE" $((FAKE_GPUS - 1)) > /etc/slurm/gres.conf
else
  rm -f /etc/slurm/gres.conf
fi

install -d /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
${MARK}: a single-node test cluster on localhost
ClusterName=lossevo-ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmdSpoolDir=${STATE}/spool
StateSaveLocation=${STATE}/ctld
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
# no slurmdbd: sacct cannot work, the profile polls squeue
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# keep finished jobs in 'squeue --states=all' (the status source, and the test's record of jobs)
MinJobAge=3600
SlurmctldDebug=info
SlurmctldLogFile=${STATE}/log/slurmctld.log
SlurmdDebug=info
SlurmdLogFile=${STATE}/log/slurmd.log
${GRES_TYPES}
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${NCPU} RealMemory=${MEM} ${GRES_NODE} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
# --- daemons (both daemonize and write their pid files) ---
/usr/sbin/slurmctld -i    # -i: ignore any saved state
for _ in $(seq 50); do [ -s "$STATE/slurmctld.pid" ] && break; sleep 0.1; done
echo "slurmctld $(cat "$STATE/slurmctld.pid")" >> "$STATE/pids"
/usr/sbin/slurmd
for _ in $(seq 50); do [ -s "$STATE/slurmd.pid" ] && break; sleep 0.1; done
echo "slurmd $(cat "$STATE/slurmd.pid")" >> "$STATE/pids"
for _ in $(seq 150); do
  timeout 5 sinfo -h -o %T 2>/dev/null | grep -q '^idle' && break; sleep 0.2
done
if ! timeout 5 sinfo -h -o %T | grep -q '^idle'; then
  echo "node not idle:" >&2; timeout 5 sinfo -N -l >&2 || true
  tail -20 "$STATE/log/slurmd.log" "$STATE/log/slurmctld.log" >&2 || true
  exit 1
fi
timeout 5 sinfo -N -o '%N %T %c %m %G'
