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
#   The job is then requeued (--requeue); the next attempt resumes from that
#   checkpoint (checkpoint.resume: auto) and continues the same W&B run. Whether to
#   requeue is decided by `python -m looptrain.launch.job end`, the rules the submitit
#   launcher uses (one source for both).
# - The signal goes to this shell rather than straight to the ranks because with
#   --kill-on-bad-exit=1 srun may report a rank's kill status instead of 18: knowing
#   that a signal came is what tells a checkpoint-and-stop from a crash.
# - Never requeued: exit 17 (the norm monitor halted the run: see HALTED.json), errors
#   (exit 1, 2), a Ctrl-C/SIGINT stop (19), scancel, and requeues at the time limit beyond
#   MAX_REQUEUES. A preemption (the signal came with much more time left) is requeued
#   without counting. The outcome also goes into the job comment (scontrol show job).
# - Every attempt appends a start and an end line to $RUN_DIR/slurm/attempts.jsonl,
#   which `looptrain status RUN_DIR` reads; rank logs are $RUN_DIR/slurm/<job>_<rank>_log.*
@@SBATCH_DIRECTIVES@@

set -uo pipefail

readonly RUN_DIR=@@RUN_DIR@@
readonly MAX_REQUEUES=@@MAX_REQUEUES@@
readonly SIGNAL_DELAY_S=@@SIGNAL_DELAY_S@@
readonly LOG_DIR=$RUN_DIR/slurm
mkdir -p "$LOG_DIR"
cd @@WORKDIR@@ || exit 1

# --- set-up lines from the cluster profile
@@SETUP@@
# ---

# Streaming keeps file locks in the temp dir: a fresh one per job and attempt.
BASE_TMPDIR=${TMPDIR:-/tmp}
export BASE_TMPDIR

attempt() {  # the attempt records and the requeue decision: looptrain.launch.job (one source with submitit's jobs)
  @@PYTHON@@ -m looptrain.launch.job "$@" --run-dir "$RUN_DIR" --max-requeues "$MAX_REQUEUES" \
    --signal-delay-s "$SIGNAL_DELAY_S"
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

attempt start
srun --kill-on-bad-exit=1 --output="$LOG_DIR/%j_%t_log.out" --error="$LOG_DIR/%j_%t_log.err" \
  bash -c 'unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT  # Slurm says who each task is
           export TMPDIR=$BASE_TMPDIR/looptrain-$SLURM_JOB_ID-r${SLURM_RESTART_COUNT:-0}
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

attempt end --rc "$rc" --signalled "$signalled" --terminated "$cancelled"
