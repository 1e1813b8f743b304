#!/usr/bin/env bash
# A real Slurm on this one machine, for mgrun's Slurm tests (tests/slurm.rs): slurmctld and two slurmd
# daemons under two node names, n1 and n2 (Debian's Slurm 22.05 supports several slurmd per host with
# `slurmd -N NAME` and a port per node), munge authentication, no cgroups (containers have none).
#
#   bash scripts/slurm-local.sh start    # installs the packages when missing (apt, as root), starts, checks
#   bash scripts/slurm-local.sh status
#   bash scripts/slurm-local.sh stop
#
# The config goes to /etc/slurm/slurm.conf, where every Slurm command (and the tests) finds it; daemon
# state and logs go to $MGRUN_SLURM_DIR (default /tmp/mgrun-slurm). The node names resolve to
# 127.0.0.1 through /etc/hosts, since mgrun reaches node 0 by the allocation's first node name.
# Each node offers 4 CPUs (more than the machine has: the test jobs are small) so that a launcher and
# two ranks fit on one node.
set -euo pipefail

DIR=${MGRUN_SLURM_DIR:-/tmp/mgrun-slurm}
CONF=/etc/slurm/slurm.conf
NODES=(n1 n2)
CTLD_PORT=16817
FIRST_NODE_PORT=17001
START_TIMEOUT_S=60

say() { echo "slurm-local: $*"; }
die() {
    echo "slurm-local: error: $*" >&2
    for log in "$DIR"/slurmctld.log "$DIR"/slurmd-*.log; do
        [ -f "$log" ] && { echo "--- last lines of $log" >&2; tail -n 15 "$log" >&2; }
    done
    exit 1
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root (apt-get)"
    say "installing slurmctld, slurmd, slurm-client and munge (apt)"
    local started=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || die "apt-get install of Slurm failed"
    say "installed in $((SECONDS - started)) s"
}

write_config() {
    local host
    host=$(hostname -s)
    mkdir -p "$DIR/ctld" /etc/slurm
    {
        echo "# Written by mgrun's scripts/slurm-local.sh: a two-node-name Slurm on this machine, for tests."
        echo "ClusterName=mgrun"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=$CTLD_PORT"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "StateSaveLocation=$DIR/ctld"
        echo "SlurmdSpoolDir=$DIR/slurmd-%n"
        echo "SlurmctldPidFile=$DIR/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
        echo "SlurmctldLogFile=$DIR/slurmctld.log"
        echo "SlurmdLogFile=$DIR/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        # Node CPUs beyond the machine's: the tests' jobs are tiny.
        echo "SlurmdParameters=config_overrides"
        echo "ReturnToService=2"
        echo "JobRequeue=1"
        echo "KillWait=5"
        echo "MinJobAge=300"
        echo "MpiDefault=none"
        local port=$FIRST_NODE_PORT
        for node in "${NODES[@]}"; do
            echo "NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$host Port=$port CPUs=4 RealMemory=1000 State=UNKNOWN"
            port=$((port + 1))
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF"
    for node in "${NODES[@]}"; do
        grep -qE "^127\.0\.0\.1[[:space:]].*[[:space:]]$node([[:space:]]|$)" /etc/hosts \
            || echo "127.0.0.1 $node" >> /etc/hosts
    done
}

munge_works() {
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
    # Ask munged itself: a process named munged may be a zombie.
    if munge_works; then
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
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
    # munged refuses to run as root: as its own user, as the package's service does.
    su -s /bin/sh munge -c /usr/sbin/munged || die "munged did not start"
    local deadline=$((SECONDS + 10))
    until munge_works; do
        [ $SECONDS -lt $deadline ] || die "munged started but does not answer on /run/munge"
        sleep 0.2
    done
}

nodes_idle() {
    local idle
    idle=$(sinfo -h -N -o "%N %t" 2>/dev/null | awk '$2 == "idle" || $2 == "mix" || $2 == "alloc" {n++} END {print n+0}')
    [ "$idle" -eq "${#NODES[@]}" ]
}

start() {
    local started=$SECONDS
    install_packages
    if munge_works && pgrep -x slurmctld >/dev/null && nodes_idle; then
        say "already running: $(sinfo -h -o '%D nodes %N %t' | tr '\n' ' ')"
        return
    fi
    stop quietly
    write_config
    start_munge
    slurmctld -f "$CONF" || die "slurmctld did not start"
    for node in "${NODES[@]}"; do
        mkdir -p "$DIR/slurmd-$node"
        slurmd -f "$CONF" -N "$node" || die "slurmd $node did not start"
    done
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until nodes_idle; do
        [ $SECONDS -lt $deadline ] || die "the nodes did not become idle within $START_TIMEOUT_S s: $(sinfo -N 2>&1 | tr '\n' ' ')"
        sleep 0.5
    done
    # One real job across both node names before the tests rely on it.
    local out
    out=$(mktemp -d)
    sbatch --wait --quiet --nodes=${#NODES[@]} --ntasks-per-node=1 --output="$out/sanity.out" \
        --wrap 'srun bash -c "echo task \$SLURM_PROCID on \$SLURMD_NODENAME"' >/dev/null \
        || die "the sanity job failed: $(cat "$out/sanity.out" 2>/dev/null)"
    for node in "${NODES[@]}"; do
        grep -q "on $node\$" "$out/sanity.out" || die "the sanity job ran no task on $node: $(cat "$out/sanity.out")"
    done
    rm -rf "$out"
    say "Slurm $(sinfo --version | awk '{print $2}') running: nodes ${NODES[*]} idle, sanity job passed ($((SECONDS - started)) s)"
}

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    local deadline=$((SECONDS + 10))
    while pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null; do
        [ $SECONDS -lt $deadline ] || { pkill -9 -x slurmd || true; pkill -9 -x slurmctld || true; break; }
        sleep 0.2
    done
    [ "${1:-}" = quietly ] || say "stopped"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) sinfo; squeue ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
