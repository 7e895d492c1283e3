#!/bin/bash
# Stop the test cluster of setup.sh: cancel its jobs, then stop the daemons it started, by the PIDs
# it recorded in $STATE/pids (each checked against its command name first, so a stale entry never
# hits an unrelated process), and removes the /etc/slurm files it wrote. Idempotent; never fails.
STATE=${STATE:-/run/lossevo-slurm}
MARK="# written by lossevo tests/slurm/setup.sh"
remove_conf() {
  for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    case "$(head -1 "$f" 2>/dev/null)" in "$MARK"*) rm -f "$f";; esac
  done
}
[ -s "$STATE/pids" ] || { remove_conf; exit 0; }
alive() { [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]; }
# cancel leftover jobs first, so no slurmstepd or job outlives the daemons (only while our
# slurmctld answers: scancel against a dead controller retries for ~20 s)
read -r _ ctld < <(grep '^slurmctld ' "$STATE/pids") || true
if [ -n "${ctld:-}" ] && alive slurmctld "$ctld"; then
  timeout 20 scancel --user="$(id -un)" 2>/dev/null && sleep 1
fi
# slurmd first, munged last (the others authenticate through it)
for name in slurmd slurmctld munged; do
  while read -r comm pid; do
    [ "$comm" = "$name" ] && alive "$comm" "$pid" || continue
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do alive "$comm" "$pid" || break; sleep 0.1; done
    alive "$comm" "$pid" && kill -KILL "$pid"
  done < "$STATE/pids"
done
rm -f "$STATE/pids"
remove_conf
exit 0
