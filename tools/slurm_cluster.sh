#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for testing looptrain's
# Slurm launcher end to end (sbatch, srun across nodes, submitit, sacct, requeue).
#
# Usage:
#   tools/slurm_cluster.sh install               # apt packages (root; quick when present)
#   tools/slurm_cluster.sh start  [STATE_DIR]    # prints `export SLURM_CONF=...` on stdout
#   tools/slurm_cluster.sh stop   [STATE_DIR]
#   tools/slurm_cluster.sh status [STATE_DIR]    # exit 0 when every daemon runs and both nodes answer
#   tools/slurm_cluster.sh env    [STATE_DIR]    # print the export line again
#
# Typical use:  eval "$(sudo tools/slurm_cluster.sh start)" && srun -N2 -n2 hostname
#
# Environment: LOOPTRAIN_SLURM_STATE_DIR (the default STATE_DIR), LOOPTRAIN_SLURM_CPUS
# (CPUs per node, default nproc, at least 2), and the TCP ports, to run a second
# cluster beside the first: LOOPTRAIN_SLURM_CTLD_PORT (16817), _DBD_PORT (16819),
# _MYSQL_PORT (16306), _SLURMD_PORT (17001 for n1, +1 for n2).
#
# Why each piece is there:
# - munged: Slurm authenticates every message with munge. It runs with its own
#   key and socket under STATE_DIR so that a system munged is never disturbed.
# - mariadbd + slurmdbd: accounting. submitit polls `sacct` for job states; without
#   accounting a cancelled or crashed job makes `job.result()` wait forever.
# - slurmctld + two slurmd (-N n1, -N n2): two emulated nodes on 127.0.0.1, so
#   multi-node jobs (srun -N2, torch.distributed across "nodes") really run.
#
# Everything the cluster writes lives under STATE_DIR (default /tmp/looptrain-slurm).
# The only change outside it is one line `127.0.0.1 n1 n2` in /etc/hosts (when the
# names do not resolve), because jobs use the first node name as the rendezvous host.
# Daemons are found and stopped by PID (pid files, plus processes whose command line
# or environment points into STATE_DIR), never by name alone.
set -euo pipefail

readonly PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
readonly CLUSTER_NAME=looptrain
readonly ACCOUNT=looptrain
readonly NODES=(n1 n2)
readonly CTLD_PORT=${LOOPTRAIN_SLURM_CTLD_PORT:-16817}
readonly DBD_PORT=${LOOPTRAIN_SLURM_DBD_PORT:-16819}
readonly MYSQL_PORT=${LOOPTRAIN_SLURM_MYSQL_PORT:-16306}
readonly SLURMD_PORT=${LOOPTRAIN_SLURM_SLURMD_PORT:-17001}  # n1; n2 uses the next one
readonly DB_NAME=slurm_acct_db
readonly DB_USER=slurm
readonly DB_PASS=looptrain-slurm-test
readonly NODE_MEM_MB=4000
# Both emulated nodes advertise the machine's CPUs (at least 2, so that
# tasks_per_node=2 fits even on a 1-core runner). Slurm does not pin tasks here.
NODE_CPUS=${LOOPTRAIN_SLURM_CPUS:-$(nproc)}
((NODE_CPUS < 2)) && NODE_CPUS=2
readonly NODE_CPUS

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- paths
set_paths() {
  STATE_DIR=$(realpath -m "${1:-${LOOPTRAIN_SLURM_STATE_DIR:-/tmp/looptrain-slurm}}")
  ETC=$STATE_DIR/etc
  RUN=$STATE_DIR/run
  LOGS=$STATE_DIR/log
  MUNGE_DIR=$STATE_DIR/munge
  MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
  MYSQL_DATA=$STATE_DIR/mysql
  MYSQL_SOCKET=$RUN/mysqld.sock
  SLURM_CONF_PATH=$ETC/slurm.conf
  # A unix socket path must stay under 108 bytes.
  ((${#MUNGE_SOCKET} < 100)) || die "STATE_DIR is too long for a unix socket path: $STATE_DIR (pick a shorter one)"
}

slurm_env() { SLURM_CONF=$SLURM_CONF_PATH "$@"; }
# sacctmgr asks y/n questions on stdin (and repeats forever on EOF): never let it.
sacctmgr_() { slurm_env timeout 30 sacctmgr "$@" </dev/null; }

require_root() {
  [[ $(id -u) == 0 ]] || die "the local Slurm cluster must be run as root (its daemons run as root/munge); try: sudo $0 $*"
}

missing_packages() {
  local pkg status
  for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || echo "$pkg"
  done
}

# ---------------------------------------------------------------- install
cmd_install() {
  command -v dpkg-query >/dev/null || die "no dpkg here: install Slurm 22.05+, munge, slurmdbd and MariaDB by hand"
  local missing
  missing=$(missing_packages | tr '\n' ' ')
  if [[ -z ${missing// /} ]]; then
    log "packages already installed: ${PACKAGES[*]}"
    return 0
  fi
  require_root install
  log "installing: $missing"
  # Debian's postinst scripts try to start services; inside containers that is
  # refused harmlessly, and we start our own copies anyway.
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}" >&2; then
    log "install failed; refreshing package lists once and retrying"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}" >&2
  fi
}

# ---------------------------------------------------------------- processes
# PIDs of live processes named $1 that belong to this STATE_DIR.
daemon_pids() {
  local comm=$1 pidfile pid
  local -A seen=()
  for pidfile in "$RUN/$comm".pid "$RUN/$comm"-*.pid; do
    [[ -f $pidfile ]] || continue
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] && belongs_here "$pid" "$comm" && seen[$pid]=1
  done
  # Catch daemons whose pid file was lost (a crashed start, a deleted run/ dir).
  for pid in $(pgrep -x "$comm" 2>/dev/null || true); do
    belongs_here "$pid" "$comm" && seen[$pid]=1
  done
  for pid in "${!seen[@]}"; do echo "$pid"; done
}

# True when PID runs binary $2 and its command line or environment names STATE_DIR.
belongs_here() {
  local pid=$1 comm=$2
  [[ -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$comm" ]] || return 1
  # Read into a variable: `| grep -q` would SIGPIPE the reader under pipefail.
  local text
  text=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline") || true
  [[ $text == *"$STATE_DIR/"* ]] && return 0
  text=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ") || true  # slurmdbd: SLURM_CONF
  [[ $text == *"$STATE_DIR/"* ]]
}

# SIGTERM every PID given, wait up to $1 seconds, then SIGKILL what is left.
terminate() {
  local wait_s=$1; shift
  (($# > 0)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  local deadline=$((SECONDS + wait_s)) pid alive
  while :; do
    alive=()
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    ((${#alive[@]} == 0)) && return 0
    ((SECONDS >= deadline)) && break
    sleep 0.1
  done
  log "still running after ${wait_s}s, sending SIGKILL: ${alive[*]}"
  kill -KILL "${alive[@]}" 2>/dev/null || true
}

stop_daemons() {
  local pids
  if [[ -f $SLURM_CONF_PATH ]] && [[ -n $(daemon_pids slurmctld) ]]; then
    cancel_all_jobs
  fi
  # Order matters: slurmctld flushes job records to slurmdbd on the way down and
  # slurmdbd writes them to MariaDB; munged is needed until the Slurm daemons are
  # gone, and then stops alongside MariaDB (each takes ~2 s to exit).
  mapfile -t pids < <(daemon_pids slurmd; daemon_pids slurmctld)
  terminate 20 "${pids[@]}"
  mapfile -t pids < <(daemon_pids slurmdbd)
  terminate 20 "${pids[@]}"
  mapfile -t pids < <(daemon_pids mariadbd; daemon_pids munged)
  terminate 30 "${pids[@]}"
  rm -f "$RUN"/*.pid "$MYSQL_SOCKET"
}

cancel_all_jobs() {
  local jobs
  jobs=$(slurm_env timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
  [[ -z ${jobs// /} ]] && return 0
  log "cancelling jobs: $jobs"
  # shellcheck disable=SC2086
  slurm_env timeout 10 scancel $jobs 2>/dev/null || true
  local deadline=$((SECONDS + 20))
  while ((SECONDS < deadline)); do
    [[ -z $(slurm_env timeout 5 squeue -h -o %A 2>/dev/null || true) ]] && return 0
    sleep 0.2
  done
  log "jobs still listed after 20s; stopping anyway"
}

# ---------------------------------------------------------------- configuration
write_configs() {
  mkdir -p "$ETC" "$RUN" "$LOGS" "$STATE_DIR/state" "${NODES[@]/#/$STATE_DIR/spool/slurmd-}"
  local auth_info="socket=$MUNGE_SOCKET"
  cat >"$SLURM_CONF_PATH" <<EOF
# Generated by tools/slurm_cluster.sh: a two-node test cluster on 127.0.0.1.
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job may restart after ~5 s instead of ~121 s.
AuthInfo=$auth_info,cred_expire=5
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
# Two slurmd on one host: trust slurm.conf rather than the detected hardware.
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1000
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# Connections to slurmdbd take their munge socket from here, not from AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageEnforce=associations
JobCompType=jobcomp/none
MailProg=/bin/true
# Finished jobs stay visible to squeue/scontrol for an hour (tests inspect them).
MinJobAge=3600
# Requeue: batch jobs may be requeued (submitit requeues itself after USR2 or
# preemption); nodes that went down return to service on their own.
JobRequeue=1
ReturnToService=2
# Seconds between SIGTERM and SIGKILL at a time limit or cancel.
KillWait=10
# An allocation whose srun/salloc died (e.g. killed by a test timeout) ends after 30 s.
InactiveLimit=30
# A job in partition "urgent" preempts jobs in "debug" by requeueing them: a
# real preemption, for testing checkpoint-and-requeue. preempt_send_user_signal: the
# preempted job first gets its own --signal (submitit: USR2, its checkpoint cue),
# then GraceTime seconds to act on it before it is killed and requeued.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
# Pending jobs whose begin time has passed (a requeued job waits cred_expire+1 s)
# are looked at every few seconds instead of every 30-60 s.
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$SLURMD_PORT-$((SLURMD_PORT + 1))] CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=20
PartitionName=urgent Nodes=n[1-2] MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
  # slurmdbd reads slurmdbd.conf next to SLURM_CONF and insists on mode 600.
  (
    umask 077
    cat >"$ETC/slurmdbd.conf" <<EOF
# Generated by tools/slurm_cluster.sh
AuthType=auth/munge
AuthInfo=$auth_info
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
  )
  chmod 600 "$ETC/slurmdbd.conf"
}

ensure_hosts_entry() {
  local node missing=()
  for node in "${NODES[@]}"; do
    getent hosts "$node" >/dev/null || missing+=("$node")
  done
  ((${#missing[@]} == 0)) && return 0
  log "adding '127.0.0.1 ${missing[*]}' to /etc/hosts"
  echo "127.0.0.1 ${missing[*]}  # looptrain local Slurm test cluster" >>/etc/hosts
}

# ---------------------------------------------------------------- daemons
wait_for() {  # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS >= deadline)) && return 1
    sleep 0.2
  done
}

start_munged() {
  install -d -o munge -g munge -m 755 "$MUNGE_DIR"  # clients must reach the socket
  if [[ ! -s $MUNGE_DIR/munge.key ]]; then
    runuser -u munge -- mungekey --create --keyfile="$MUNGE_DIR/munge.key" >&2
  fi
  chown munge:munge "$MUNGE_DIR/munge.key"
  chmod 400 "$MUNGE_DIR/munge.key"
  runuser -u munge -- /usr/sbin/munged \
    --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" </dev/null >/dev/null 2>"$LOGS/munged.stderr" 9>&- ||
    die "munged did not start: $(cat "$LOGS/munged.stderr")"
  wait_for 10 test -S "$MUNGE_SOCKET" || die "munged did not create its socket; see $MUNGE_DIR/munged.log"
  cp "$MUNGE_DIR/munged.pid" "$RUN/munged.pid"
}

mysql_root() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -uroot "$@"; }

start_mariadb() {
  if [[ ! -d $MYSQL_DATA/mysql ]]; then
    log "initialising MariaDB in $MYSQL_DATA"
    mkdir -p "$MYSQL_DATA"
    mariadb-install-db --no-defaults --datadir="$MYSQL_DATA" --user=root \
      --auth-root-authentication-method=socket --skip-test-db >"$LOGS/mariadb-install.log" 2>&1 ||
      die "mariadb-install-db failed; see $LOGS/mariadb-install.log"
  fi
  setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$MYSQL_DATA" \
    --socket="$MYSQL_SOCKET" --pid-file="$RUN/mariadbd.pid" --port="$MYSQL_PORT" \
    --bind-address=127.0.0.1 --skip-name-resolve --log-error="$LOGS/mariadbd.log" \
    --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 9>&- &
  wait_for 60 mysql_root -e 'SELECT 1' || die "MariaDB did not start; see $LOGS/mariadbd.log"
  mysql_root <<EOF
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
EOF
}

start_slurmdbd() {
  slurm_env setsid /usr/sbin/slurmdbd </dev/null >/dev/null 2>&1 9>&- ||
    die "slurmdbd failed to start; see $LOGS/slurmdbd.log"
  wait_for 30 sacctmgr_ -n list cluster || die "slurmdbd did not answer; see $LOGS/slurmdbd.log"
}

register_accounting() {
  if [[ -z $(sacctmgr_ -n -P list cluster format=cluster where cluster=$CLUSTER_NAME) ]]; then
    sacctmgr_ -i add cluster "$CLUSTER_NAME" >&2
  fi
  if [[ -z $(sacctmgr_ -n -P list account format=account where account=$ACCOUNT) ]]; then
    sacctmgr_ -i add account "$ACCOUNT" cluster="$CLUSTER_NAME" \
      description="looptrain test jobs" organization=looptrain >&2
  fi
  if [[ -z $(sacctmgr_ -n -P list assoc format=user where user=root account=$ACCOUNT cluster=$CLUSTER_NAME) ]]; then
    sacctmgr_ -i add user root account="$ACCOUNT" defaultaccount="$ACCOUNT" cluster="$CLUSTER_NAME" >&2
  fi
}

start_slurm() {
  slurm_env setsid /usr/sbin/slurmctld -f "$SLURM_CONF_PATH" </dev/null >/dev/null 2>&1 9>&- ||
    die "slurmctld failed to start; see $LOGS/slurmctld.log"
  local node
  for node in "${NODES[@]}"; do
    slurm_env setsid /usr/sbin/slurmd -N "$node" -f "$SLURM_CONF_PATH" </dev/null >/dev/null 2>&1 9>&- ||
      die "slurmd -N $node failed to start; see $LOGS/slurmd-$node.log"
  done
}

# 0: both nodes idle; 1: not yet; 2: a node is invalid or drained (waiting will not help).
nodes_idle() {
  local states
  states=$(slurm_env sinfo -h -N -p debug -o '%N %T' 2>/dev/null | sort -u)
  [[ $states == $'n1 idle\nn2 idle' ]] && return 0
  [[ $states =~ inval|drain ]] && return 2
  return 1
}

wait_for_nodes() {
  local deadline=$((SECONDS + $1)) rc
  while :; do
    rc=0; nodes_idle || rc=$?
    ((rc == 0)) && return 0
    ((rc == 2 || SECONDS >= deadline)) && return 1
    sleep 0.25
  done
}

cmd_start() {
  require_root start
  local missing
  missing=$(missing_packages | tr '\n' ' ')
  [[ -z ${missing// /} ]] || die "missing packages: $missing(run: $0 install)"
  mkdir -p "$STATE_DIR"
  exec 9>"$STATE_DIR/.lock"
  flock -w 120 9 || die "another start/stop holds $STATE_DIR/.lock"
  local t0=$SECONDS
  # A failed start leaves nothing running behind it.
  trap 'log "start failed: stopping what was started"; stop_daemons' EXIT
  if [[ -n $(daemon_pids munged; daemon_pids mariadbd; daemon_pids slurmdbd; daemon_pids slurmctld; daemon_pids slurmd) ]]; then
    log "daemons of a previous cluster in $STATE_DIR are running: stopping them first"
    stop_daemons
  fi
  rm -f "$RUN"/*.pid "$MYSQL_SOCKET"
  ensure_hosts_entry
  write_configs
  start_munged
  start_mariadb
  start_slurmdbd
  register_accounting
  start_slurm
  if ! wait_for_nodes 30; then
    # A node left DOWN/DRAIN by an earlier crash: resume it once and wait again.
    slurm_env scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
    wait_for_nodes 15 || {
      slurm_env sinfo -N -R >&2 || true
      tail -n 5 "$LOGS"/slurmctld.log "$LOGS"/slurmd-*.log >&2 || true
      die "nodes did not become idle; logs are in $LOGS"
    }
  fi
  trap - EXIT
  log "cluster '$CLUSTER_NAME' up in $((SECONDS - t0))s (state in $STATE_DIR)"
  cmd_env
}

cmd_stop() {
  if [[ ! -d $STATE_DIR ]]; then
    log "nothing to stop: $STATE_DIR does not exist"
    return 0
  fi
  require_root stop
  exec 9>"$STATE_DIR/.lock"
  flock -w 120 9 || die "another start/stop holds $STATE_DIR/.lock"
  local t0=$SECONDS
  stop_daemons
  log "cluster stopped in $((SECONDS - t0))s (state kept in $STATE_DIR)"
}

cmd_status() {
  local ok=0 comm pids
  for comm in munged mariadbd slurmdbd slurmctld slurmd; do
    pids=$(daemon_pids "$comm" | tr '\n' ' ')
    if [[ -n ${pids// /} ]]; then
      printf '%-10s running (pid %s)\n' "$comm" "${pids% }"
    else
      printf '%-10s stopped\n' "$comm"
      ok=1
    fi
  done
  if ((ok == 0)); then
    slurm_env sinfo -N -o '%N %P %T %c %m %G' || ok=1
    # Busy nodes are fine; down, drained or silent ones are not.
    local states
    states=$(slurm_env sinfo -h -N -o '%T' 2>&1) || ok=1
    [[ $states =~ down|drain|fail|unknown|not_responding ]] && ok=1
  fi
  return $ok
}

cmd_env() {
  echo "export SLURM_CONF=$SLURM_CONF_PATH"
}

main() {
  local cmd=${1:-}
  shift || true
  case $cmd in
    install) cmd_install ;;
    start) set_paths "${1:-}"; cmd_start ;;
    stop) set_paths "${1:-}"; cmd_stop ;;
    status) set_paths "${1:-}"; cmd_status ;;
    env) set_paths "${1:-}"; cmd_env ;;
    *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
}

main "$@"
