#!/usr/bin/env bash
# A real Slurm on this one machine, for mgrun's Slurm tests (tests/slurm.rs): slurmctld plus two slurmd
# daemons under two node names, n1 and n2, munge authentication, and no cgroups (containers have none).
#
#   bash scripts/slurm-local.sh start    # installs the packages when missing (apt, as root), starts, checks
#   bash scripts/slurm-local.sh check    # submits the sanity job again (the cluster must be running)
#   bash scripts/slurm-local.sh status   # sinfo and squeue
#   bash scripts/slurm-local.sh stop     # stops the daemons that `start` started
#
# `start` is idempotent: when the daemons it started are still up with the same config and the nodes
# are usable, it only says so (a second or less); otherwise it stops its own daemons, starts afresh
# from a clean state (no old jobs, job ids from 1), waits for both nodes to be idle and runs a sanity
# job (`sbatch --wait`, one `srun` task on each node name). Any failure exits non-zero, names what
# failed and prints the tail of the daemon logs.
#
# What it uses (Debian 12, bookworm): Slurm 22.05 from Debian's packages (slurmctld, slurmd,
# slurm-client, munge; about 12 s to install). Debian builds Slurm with multiple-slurmd support, so one
# machine runs one slurmd per node name (`slurmd -N n1`, `slurmd -N n2`), each on its own port.
#
# Where things are:
# - The config is written to /etc/slurm/slurm.conf, the default location, so every Slurm command run by
#   any process (the tests, mgrun, jobs) finds it without SLURM_CONF. A copy is kept in the state dir.
#   (MGRUN_SLURM_CONF=PATH writes it elsewhere instead; then export SLURM_CONF=PATH to use that cluster.)
# - Daemon state, spool dirs, pid files and logs: $MGRUN_SLURM_DIR (default /tmp/mgrun-slurm).
# - The node names n1 and n2 resolve to 127.0.0.1 through /etc/hosts (added when missing): mgrun reaches
#   node 0 by the allocation's first node name.
# - Ports: slurmctld 16817, slurmd n1 17001 and n2 17002 (MGRUN_SLURM_CTLD_PORT and
#   MGRUN_SLURM_NODE_PORT move them, e.g. to run a second cluster for trying out this script).
#
# Config choices (see slurm_conf below):
# - Each node offers CPUs=4 (more than the 2 real cores; SlurmdParameters=config_overrides stops slurmd
#   from draining a node whose hardware is smaller), so a launcher and two ranks fit on one node.
#   SelectTypeParameters=CR_CPU: memory is not a consumable resource and nothing enforces it.
# - No cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, JobAcctGatherType=none, no
#   accounting storage (so no sacct: use `scontrol show job`, which keeps a finished job for MinJobAge).
#   No cgroup.conf either. slurmd 22.05 still initialises its cgroup plugin at start and refuses to run
#   when /sys/fs/cgroup is not mounted at all ("cgroup filesystem not mounted"); this machine kind
#   mounts it (cgroup v1), and nothing in a job uses it.
# - JobRequeue=1; AuthInfo=cred_expire=10: a requeued job may start again 11 s after the requeue
#   (Slurm's default is 120 s + 1: a requeued job's BeginTime is now + cred_expire + 1);
#   SchedulerParameters=sched_interval=2,bf_interval=1 so that it, and every other pending job, is
#   started within a few seconds of becoming eligible (the defaults are 60 s and 30 s).
# - KillWait=5: SIGTERM to SIGKILL when a job is cancelled, requeued or runs out of time.
set -euo pipefail

DIR=${MGRUN_SLURM_DIR:-/tmp/mgrun-slurm}
CONF=${MGRUN_SLURM_CONF:-/etc/slurm/slurm.conf}
CTLD_PORT=${MGRUN_SLURM_CTLD_PORT:-16817}
FIRST_NODE_PORT=${MGRUN_SLURM_NODE_PORT:-17001}
NODES=(n1 n2)
CPUS_PER_NODE=4
CRED_EXPIRE_S=10
START_TIMEOUT_S=60
SANITY_TIMEOUT_S=60
PACKAGES=(slurmctld slurmd slurm-client munge)
# This script's own Slurm commands use this cluster's config.
export SLURM_CONF=$CONF

say() { echo "slurm-local: $*"; }

# The daemons' logs, less the PMIx plugin's lines (Debian's mpi/pmix plugins fail to load without
# libpmix, which nothing here uses: harmless noise).
show_logs() {
    local log
    for log in "$DIR"/slurmctld.log "$DIR"/slurmd-*.log "$DIR"/slurmctld.out "$DIR"/slurmd-*.out; do
        if [ -s "$log" ]; then
            echo "--- last lines of $log" >&2
            grep -v -i -E 'pmix|MPI: Cannot create context' "$log" | tail -n 20 >&2
        fi
    done
}

# Set once `start` launches daemons: a failed start then stops them again (their logs stay).
LAUNCHED=0
STOPPED=""

die() {
    echo "slurm-local: error: $*" >&2
    if [ "$LAUNCHED" = 1 ]; then
        show_logs
        echo "slurm-local: stopping the daemons this start launched (logs stay in $DIR)" >&2
        stop_daemons
    fi
    exit 1
}

# ---- install --------------------------------------------------------------------------------------

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" = 0 ] || die "Slurm is not installed (missing: ${missing[*]}) and installing it needs root (apt-get)"
    command -v apt-get >/dev/null || die "Slurm is not installed (missing: ${missing[*]}) and there is no apt-get"
    say "installing ${PACKAGES[*]} (apt; missing: ${missing[*]})"
    local started=$SECONDS log
    log=$(mktemp)
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be missing or old on a fresh machine: update first, always (about 2 s).
    if ! apt-get update -qq >"$log" 2>&1; then
        cat "$log" >&2
        die "apt-get update failed"
    fi
    if ! apt-get install -y --no-install-recommends "${PACKAGES[@]}" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "apt-get install ${PACKAGES[*]} failed"
    fi
    rm -f "$log"
    # The packages' init scripts may have started daemons of their own (with no config they fail, but a
    # munged may be up): that is fine, munge below reuses a working munged.
    say "installed in $((SECONDS - started)) s"
}

# ---- config ---------------------------------------------------------------------------------------

slurm_conf() {
    local host port node
    host=$(hostname -s)
    echo "# Written by mgrun's scripts/slurm-local.sh: a two-node-name Slurm on this machine, for tests."
    echo "ClusterName=mgrun"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmctldPort=$CTLD_PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # A requeued job may start again cred_expire + 1 seconds after the requeue (default 120).
    echo "AuthInfo=cred_expire=$CRED_EXPIRE_S"
    echo "StateSaveLocation=$DIR/ctld"
    echo "SlurmdSpoolDir=$DIR/slurmd-%n"
    echo "SlurmctldPidFile=$DIR/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/slurmctld.log"
    echo "SlurmdLogFile=$DIR/slurmd-%n.log"
    echo "SlurmctldDebug=info"
    echo "SlurmdDebug=info"
    echo "MailProg=/bin/true"
    # No cgroups in a container: track processes by their parents, bind nothing, gather nothing.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "MpiDefault=none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    # More CPUs per node than the machine has: slurmd keeps the configured count instead of draining.
    echo "SlurmdParameters=config_overrides"
    echo "ReturnToService=2"
    echo "JobRequeue=1"
    echo "KillWait=5"
    # Finished jobs stay visible to `scontrol show job` for 5 minutes (there is no sacct).
    echo "MinJobAge=300"
    echo "SchedulerType=sched/backfill"
    echo "SchedulerParameters=sched_interval=2,bf_interval=1"
    port=$FIRST_NODE_PORT
    for node in "${NODES[@]}"; do
        echo "NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$host Port=$port CPUs=$CPUS_PER_NODE RealMemory=1000 State=UNKNOWN"
        port=$((port + 1))
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
}

write_config() {
    mkdir -p "$DIR" "$(dirname "$CONF")"
    slurm_conf >"$CONF.tmp.$$"
    mv "$CONF.tmp.$$" "$CONF"
    cp "$CONF" "$DIR/slurm.conf"
    # No cgroup.conf: with proctrack/linuxproc and task/none no daemon reads one.
    local node
    for node in "${NODES[@]}"; do
        if ! getent hosts "$node" | grep -q '^127\.0\.0\.1[[:space:]]'; then
            echo "127.0.0.1 $node" >>/etc/hosts 2>/dev/null \
                || say "warning: cannot add '127.0.0.1 $node' to /etc/hosts: node name $node does not resolve"
        fi
    done
}

config_current() {
    [ -f "$CONF" ] && [ "$(slurm_conf)" = "$(cat "$CONF")" ]
}

# ---- munge ----------------------------------------------------------------------------------------

munge_works() {
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
    munge_works && return
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --force >/dev/null
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    # A munged left over with a stale socket: munged refuses to start while its pid file names a
    # live process, so only a dead one's files are removed.
    if [ -f /run/munge/munged.pid ] && ! live_pid /run/munge/munged.pid munged >/dev/null; then
        rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    fi
    # munged refuses to run as root: it runs as its own user, as the package's service does.
    su -s /bin/sh munge -c /usr/sbin/munged || die "munged did not start"
    local deadline=$((SECONDS + 10))
    until munge_works; do
        if [ $SECONDS -ge $deadline ]; then
            tail -n 20 /var/log/munge/munged.log >&2 2>/dev/null || true
            die "munged started but 'munge -n | unmunge' fails (munged's log above)"
        fi
        sleep 0.2
    done
    # Remembered so that `stop` stops only a munged that `start` started.
    cat /run/munge/munged.pid >"$DIR/munged.pid" 2>/dev/null || true
}

# ---- daemons --------------------------------------------------------------------------------------

# The pid in FILE when that process is alive and is the program NAME.
live_pid() {
    local file=$1 name=$2 pid
    [ -s "$file" ] || return 1
    pid=$(cat "$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
    echo "$pid"
}

daemons_up() {
    live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null || return 1
    local node
    for node in "${NODES[@]}"; do
        live_pid "$DIR/slurmd-$node.pid" slurmd >/dev/null || return 1
    done
}

# Node states from sinfo, e.g. "n1 idle\nn2 mix".
node_states() {
    sinfo -h -N -o "%N %t" 2>/dev/null | sort -u
}

# All nodes usable: idle, or running jobs already.
nodes_usable() {
    local usable
    usable=$(node_states | awk '$2 == "idle" || $2 == "mix" || $2 == "alloc" {n++} END {print n+0}')
    [ "$usable" -eq "${#NODES[@]}" ]
}

nodes_idle() {
    local idle
    idle=$(node_states | awk '$2 == "idle" {n++} END {print n+0}')
    [ "$idle" -eq "${#NODES[@]}" ]
}

pids_with_conf() {
    local cmdline pid
    for cmdline in /proc/[0-9]*/cmdline; do
        pid=${cmdline#/proc/}
        pid=${pid%/cmdline}
        case "$(tr '\0' ' ' 2>/dev/null <"$cmdline")" in
            "slurmctld -f $CONF "* | "slurmd -f $CONF -N "*) echo "$pid" ;;
        esac
    done
}

# Stops this cluster's daemons (with `all`, also a munged that `start` started): all at once, by pid,
# SIGTERM, then SIGKILL for any still there after 10 s. Other Slurm daemons are left alone.
stop_daemons() {
    local pids=() node pid
    for node in "${NODES[@]}"; do
        pid=$(live_pid "$DIR/slurmd-$node.pid" slurmd) && pids+=("$pid")
    done
    pid=$(live_pid "$DIR/slurmctld.pid" slurmctld) && pids+=("$pid")
    if [ "${1:-}" = all ]; then
        pid=$(live_pid "$DIR/munged.pid" munged) && pids+=("$pid")
        rm -f "$DIR/munged.pid"
    fi
    for pid in $(pids_with_conf); do
        pids+=("$pid")
    done
    if [ ${#pids[@]} -gt 0 ]; then
        mapfile -t pids < <(printf '%s\n' "${pids[@]}" | sort -un)
        kill "${pids[@]}" 2>/dev/null || true
        local deadline=$((SECONDS + 10))
        while kill -0 "${pids[@]}" 2>/dev/null; do
            if [ $SECONDS -ge $deadline ]; then
                kill -9 "${pids[@]}" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    fi
    rm -f "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"
    STOPPED=${pids[*]}
}

stop() {
    stop_daemons all
    say "stopped${STOPPED:+ (pids $STOPPED)}"
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# The ports must be free: another Slurm answering on them would pass every check below.
check_ports() {
    local port=$CTLD_PORT what=slurmctld node
    for node in "" "${NODES[@]}"; do
        [ -n "$node" ] && what="slurmd $node"
        if port_in_use "$port"; then
            local who=""
            command -v ss >/dev/null && who=$(ss -Hltnp "sport = :$port" 2>/dev/null | tr -s ' ' | paste -sd';')
            die "port $port (for $what) is already in use${who:+: $who}; stop that process, or move this cluster with MGRUN_SLURM_CTLD_PORT / MGRUN_SLURM_NODE_PORT"
        fi
        if [ -z "$node" ]; then port=$FIRST_NODE_PORT; else port=$((port + 1)); fi
    done
}

start_daemons() {
    check_ports
    # A clean state each time: no jobs of an earlier cluster, no drained nodes, job ids from 1.
    rm -rf "$DIR/ctld" "$DIR"/slurmd-* "$DIR"/*.log "$DIR"/*.out
    mkdir -p "$DIR/ctld"
    LAUNCHED=1
    # The daemons fork into the background; their own stdout and stderr (errors before their log
    # file opens) go to .out files.
    slurmctld -f "$CONF" >"$DIR/slurmctld.out" 2>&1 || die "slurmctld did not start (slurmctld -f $CONF)"
    local node
    for node in "${NODES[@]}"; do
        mkdir -p "$DIR/slurmd-$node"
        slurmd -f "$CONF" -N "$node" >"$DIR/slurmd-$node.out" 2>&1 \
            || die "slurmd for node $node did not start (slurmd -f $CONF -N $node)$([ -d /sys/fs/cgroup ] || echo ': /sys/fs/cgroup is missing, and slurmd needs it mounted')"
    done
    local begun=$SECONDS deadline=$((SECONDS + START_TIMEOUT_S)) resumed=0
    until daemons_up && nodes_idle; do
        if [ $((SECONDS - begun)) -ge 3 ]; then
            live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null || die "slurmctld exited (see its log below)"
            for node in "${NODES[@]}"; do
                live_pid "$DIR/slurmd-$node.pid" slurmd >/dev/null || die "slurmd for node $node exited (see its log below)"
            done
        fi
        if [ $SECONDS -ge $deadline ]; then
            die "the nodes did not become idle within $START_TIMEOUT_S s: $(sinfo -N -o '%N %t %E' 2>&1 | tr '\n' ';')"
        fi
        # A node drained or down (e.g. by an earlier registration): resume it once.
        if [ $resumed = 0 ] && node_states | grep -qE ' (drain|drng|down|fail)'; then
            scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 0.3
    done
}

# One real job across both node names: each srun task prints what Slurm tells it.
sanity_job() {
    local out rc=0
    out=$(mktemp -d /tmp/mgrun-slurm-sanity.XXXXXX)
    cat >"$out/sanity.sbatch" <<'EOF'
#!/bin/bash
echo "batch: host=$(hostname) node=$SLURMD_NODENAME job=$SLURM_JOB_ID nodelist=$SLURM_JOB_NODELIST cwd=$PWD"
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 bash -c \
    'echo "task: node=$SLURMD_NODENAME nodelist=$SLURM_JOB_NODELIST nodeid=$SLURM_NODEID procid=$SLURM_PROCID localid=$SLURM_LOCALID"'
EOF
    (cd "$out" && timeout "$SANITY_TIMEOUT_S" sbatch --wait --quiet --job-name=mgrun-sanity \
        --nodes=${#NODES[@]} --ntasks-per-node=1 --time=2 --output="$out/sanity.out" sanity.sbatch) \
        >"$out/sbatch.said" 2>&1 || rc=$?
    if [ $rc -ne 0 ]; then
        cat "$out/sbatch.said" "$out/sanity.out" 2>/dev/null >&2
        [ $rc -eq 124 ] && die "the sanity job did not finish within $SANITY_TIMEOUT_S s (squeue: $(squeue -h 2>&1 | tr '\n' ';'))"
        die "the sanity job failed (sbatch --wait exit $rc); its output is above"
    fi
    local node i=0
    for node in "${NODES[@]}"; do
        grep -q "^task: node=$node .* nodeid=$i procid=$i localid=0\$" "$out/sanity.out" \
            || { cat "$out/sanity.out" >&2; die "the sanity job ran no task on node $node (output above)"; }
        i=$((i + 1))
    done
    sed 's/^/  /' "$out/sanity.out"
    rm -rf "$out"
}

start() {
    local started=$SECONDS
    [ "$(id -u)" = 0 ] || die "start needs root (SlurmUser=root, munge, /etc/slurm)"
    install_packages
    mkdir -p "$DIR"
    if daemons_up && config_current && munge_works && nodes_usable; then
        say "already running: $(node_states | tr '\n' ' ')(config $CONF)"
        return
    fi
    stop_daemons
    write_config
    start_munge
    start_daemons
    say "nodes up: $(node_states | tr '\n' ' ')($((SECONDS - started)) s); sanity job:"
    sanity_job
    say "Slurm $(sinfo --version | awk '{print $2}') running: ${#NODES[*]} nodes (${NODES[*]}), config $CONF, state and logs in $DIR ($((SECONDS - started)) s)"
    if [ "$CONF" != /etc/slurm/slurm.conf ]; then
        say "the config is not at the default location: export SLURM_CONF=$CONF"
    fi
}

check() {
    daemons_up || die "the daemons are not running: run '$0 start'"
    sanity_job
    say "sanity job passed"
}

status() {
    sinfo -N -o "%N %P %t %c %O %E" || true
    squeue || true
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    check) check ;;
    *) echo "usage: $0 start|stop|status|check" >&2; exit 2 ;;
esac
