#!/bin/bash
# looptrain: one training run as a plain sbatch job, for clusters without submitit.
# Rendered by `looptrain launch RECIPE --cluster PROFILE --emit-sbatch FILE`, which
# fills in every placeholder below; submit the result with `sbatch FILE`.
#
# How it works
# - srun starts one `looptrain train` process per task (one rank per GPU, or per CPU
#   worker slot). Each reads SLURM_PROCID/SLURM_NTASKS/SLURM_JOB_NODELIST itself:
#   MASTER_ADDR is the job's first node, MASTER_PORT a port this script found free there.
# - At the warning before the time limit (--signal=B:USR2@N), or on preemption, Slurm
#   signals this batch shell; the trap passes USR2 on to every rank through srun. The
#   ranks agree on a step, write one sharded checkpoint, and exit with status 18.
#   This script then requeues the job (--requeue); the next attempt resumes from that
#   checkpoint (checkpoint.resume: auto) and continues the same W&B run.
# - The signal goes to this shell rather than straight to the ranks because with
#   --kill-on-bad-exit=1 srun may report a rank's kill status instead of 18: knowing
#   that a signal came is what tells a checkpoint-and-stop from a crash.
# - Never requeued: exit 17 (the norm monitor halted the run: see HALTED.json), errors
#   (exit 1, 2), and requeues at the time limit beyond MAX_REQUEUES. A preemption (the
#   signal came with much more time left) is requeued without counting.
# - Every attempt appends a start and an end line to $RUN_DIR/slurm/attempts.jsonl,
#   which `looptrain status RUN_DIR` reads; rank logs are $RUN_DIR/slurm/<job>_<rank>_log.*
@@SBATCH_DIRECTIVES@@

set -uo pipefail

readonly RUN_DIR=@@RUN_DIR@@
readonly MAX_REQUEUES=@@MAX_REQUEUES@@
readonly SIGNAL_DELAY_S=@@SIGNAL_DELAY_S@@
readonly TIMEOUT_MARGIN_S=90  # Slurm checks time limits every 30 s and may signal ~60 s early
readonly ATTEMPTS=$RUN_DIR/slurm/attempts.jsonl
readonly LOG_DIR=$RUN_DIR/slurm
readonly RESTART=${SLURM_RESTART_COUNT:-0}
if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
  readonly JOB_ID=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
else
  readonly JOB_ID=$SLURM_JOB_ID
fi
mkdir -p "$LOG_DIR"
cd @@WORKDIR@@ || exit 1

# --- set-up lines from the cluster profile
@@SETUP@@
# ---

# Streaming keeps file locks in the temp dir: a fresh one per job and attempt.
BASE_TMPDIR=${TMPDIR:-/tmp}
export BASE_TMPDIR

record() {  # record EVENT [OUTCOME EXIT_CODE REQUEUE_KIND REASON]
  local extra=""
  if [[ $1 == end ]]; then
    extra=$(printf ', "outcome": "%s", "exit_code": %d' "$2" "$3")
    [[ -n ${4:-} ]] && extra+=$(printf ', "requeue_kind": "%s"' "$4")
    [[ -n ${5:-} ]] && extra+=$(printf ', "reason": "%s"' "${5//\"/\'}")
  fi
  printf '{"event": "%s", "job_id": "%s", "restart": %d, "time": %s, "launcher": "sbatch", "host": "%s"%s}\n' \
    "$1" "$JOB_ID" "$RESTART" "$(date +%s.%N)" "$(hostname)" "$extra" >>"$ATTEMPTS"
  # Slurm's accounting says FAILED for a halt and an error alike: the job comment tells them apart.
  if [[ $1 == end ]]; then
    scontrol update "JobId=$SLURM_JOB_ID" "Comment=looptrain: $2 (exit $3)${5:+: $5}" >/dev/null 2>&1 || true
  fi
}

seconds_left() {  # start + time limit - now (the end time moves on preemption); nothing when unknown
  local line start limit days=0 h=0 m=0 s=0 parts
  line=$(squeue -h -j "$SLURM_JOB_ID" -o '%S|%l' 2>/dev/null) || return 0
  start=$(date -d "${line%%|*}" +%s 2>/dev/null) || return 0
  limit=${line#*|}
  if [[ $limit == *-* ]]; then days=${limit%%-*}; limit=${limit#*-}; fi
  IFS=: read -r -a parts <<<"$limit"
  case ${#parts[@]} in
    3) h=${parts[0]} m=${parts[1]} s=${parts[2]} ;;
    2) m=${parts[0]} s=${parts[1]} ;;
    1) m=${parts[0]} ;;
    *) return 0 ;;
  esac
  [[ $days$h$m$s =~ ^[0-9]+$ ]] || return 0  # UNLIMITED, NOT_SET
  echo $((start + ((10#$days * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s - $(date +%s)))
}

signalled=0
cancelled=0
srun_pid=
# USR2: the checkpoint warning. TERM: scancel (the ranks got it too, and checkpoint);
# this shell must outlive srun either way, or Slurm would kill the ranks mid-save.
trap 'signalled=1; [[ -n $srun_pid ]] && kill -USR2 "$srun_pid" 2>/dev/null' USR2
trap 'cancelled=1' TERM

# The rendezvous port: free on this host (the job's first node, MASTER_ADDR) right now.
LOOPTRAIN_MASTER_PORT=$(@@PYTHON@@ -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
export LOOPTRAIN_MASTER_PORT

record start
srun --kill-on-bad-exit=1 --output="$LOG_DIR/%j_%t_log.out" --error="$LOG_DIR/%j_%t_log.err" \
  bash -c 'export TMPDIR=$BASE_TMPDIR/looptrain-$SLURM_JOB_ID-r${SLURM_RESTART_COUNT:-0}
           mkdir -p "$TMPDIR" && exec "$@"' \
  looptrain-rank @@PYTHON@@ -m looptrain.cli train @@TRAIN_ARGS@@ &
srun_pid=$!
# `wait` returns early when a trapped signal arrives: keep waiting until srun is gone.
rc=0
while kill -0 "$srun_pid" 2>/dev/null; do
  wait "$srun_pid"
  rc=$?
done
wait "$srun_pid" 2>/dev/null
last=$?
[[ $last != 127 ]] && rc=$last

# A halt is decided by all ranks together, but with --kill-on-bad-exit the first rank to exit 17
# gets the others terminated, and srun may report their kill status: the halt record (written in
# this attempt, so newer than its start record) is what tells.
if [[ $rc != 0 && $RUN_DIR/HALTED.json -nt $ATTEMPTS ]]; then
  rc=17
fi
case $rc in
  0) record end finished 0; exit 0 ;;
  17)
    rule=$(@@PYTHON@@ -c 'import json, sys; h = json.load(open(sys.argv[1])); print("monitor rule %s at step %s: %s" % (h["rule"], h["step"], h["message"]))' \
      "$RUN_DIR/HALTED.json" 2>/dev/null)
    record end halted 17 "" "$rule"; exit 17 ;;
  19) record end cancelled 19 "" "stopped by SIGINT"; exit 0 ;;
  1 | 2) record end failed "$rc"; exit "$rc" ;;
esac
if [[ $rc != 18 && $signalled == 0 ]] || [[ -f $RUN_DIR/HALTED.json ]]; then
  record end failed "$rc"
  exit "$rc"
fi

left=$(seconds_left)
kind=timeout
[[ -n $left ]] && ((left > SIGNAL_DELAY_S + TIMEOUT_MARGIN_S)) && kind=preemption
if ((cancelled)); then
  record end cancelled "$rc" "$kind" "the job was cancelled"
  exit "$rc"
fi
if [[ $kind == timeout ]]; then
  done_requeues=$(grep -F "\"job_id\": \"$JOB_ID\"" "$ATTEMPTS" | grep -F '"outcome": "requeued"' |
    grep -c -F '"requeue_kind": "timeout"')
  if ((done_requeues >= MAX_REQUEUES)); then
    record end stopped "$rc" "$kind" "time-limit requeue cap reached ($done_requeues of max_requeues=$MAX_REQUEUES)"
    exit "$rc"
  fi
fi
# Recorded first: the requeue ends this shell.
record end requeued "$rc" "$kind"
if [[ $rc == 18 ]]; then
  echo "looptrain: checkpointed; requeueing job $JOB_ID ($kind)"
else  # the ranks did not confirm a checkpoint (killed before it was written)
  echo "looptrain: requeueing job $JOB_ID ($kind) without a new checkpoint (ranks exited $rc); it resumes from the last committed one"
fi
if ! scontrol requeue "$SLURM_JOB_ID"; then
  record end stopped "$rc" "$kind" "scontrol requeue failed"
  exit "$rc"
fi
exit 0
