#!/usr/bin/env bash
# A real Slurm (22.05, Debian packages) of N nodes on localhost, with accounting, for tests and
# for trying the suite on a laptop or a CI machine. Runs everything as root.
#
#   bash sbatch/slurm_local.sh up [--nodes N]   install (apt) if needed, write configs, start, wait until usable
#   bash sbatch/slurm_local.sh status           what runs, the nodes, the queue
#   bash sbatch/slurm_local.sh down             stop every daemon this script started
#
# What runs: munged (auth), mysqld_safe/mariadbd (private datadir, own socket and port, so a
# system MariaDB is left alone), slurmdbd (accounting -> sacct works), slurmctld, and one slurmd
# per node (`slurmd -N nK`: nodes n1..nN on this host, each with its own Port=). The node names go
# into /etc/hosts (127.0.0.1), since a job's rendezvous address is its first node's name.
# State, spool, logs, pid files and the database live under $NANOCHAT_SLURM_DIR
# (default /tmp/nanochat-slurm). The daemons read /etc/slurm/*.conf (SLURM_CONF does not reach
# every process that needs it), so this script writes slurm.conf, slurmdbd.conf and cgroup.conf there.
#
# Knobs (environment): NANOCHAT_SLURM_DIR, NANOCHAT_SLURM_NODES (default 2: the multi-node tests
# need two; --nodes wins), NANOCHAT_SLURM_CPUS (CPUs declared in all, split over the nodes, at least
# 8 each; default max(16, nproc): more than the cores, so an array of small tasks runs concurrently),
# NANOCHAT_SLURM_CLUSTER (default "nanochat"), NANOCHAT_SLURM_DB_PORT (default 3307),
# NANOCHAT_SLURM_TIMEOUT (seconds `up` waits for the node and sacct, default 120).
set -uo pipefail

DIR="${NANOCHAT_SLURM_DIR:-/tmp/nanochat-slurm}"
CLUSTER="${NANOCHAT_SLURM_CLUSTER:-nanochat}"
DB_PORT="${NANOCHAT_SLURM_DB_PORT:-3307}"
TIMEOUT="${NANOCHAT_SLURM_TIMEOUT:-120}"
NODES="${NANOCHAT_SLURM_NODES:-2}"
PORT_BASE=17000   # slurmd of node nK listens on PORT_BASE + K
ETC=/etc/slurm
HOST="$(hostname -s)"
DB_SOCK="$DIR/mysql/mysqld.sock"
DB_PASS="nanochat-local"   # a throwaway password for a database bound to 127.0.0.1 only

log() { echo "[slurm_local] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pid_alive() {   # pid_alive FILE -> 0 when the pid in FILE is a running process
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

# ----------------------------------------------------------------------------- install

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mysqld_safe >/dev/null || missing+=(mariadb-server)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "Slurm is not installed and installing needs root (missing: ${missing[*]})"
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get here (missing: ${missing[*]})"
    log "installing slurm-wlm slurmdbd mariadb-server munge with apt-get (missing: ${missing[*]})"
    apt-get update -q >"$DIR/apt.log" 2>&1 || { tail -20 "$DIR/apt.log" >&2; die "apt-get update failed (log: $DIR/apt.log)"; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurm-wlm slurmdbd mariadb-server munge >>"$DIR/apt.log" 2>&1 \
        || { tail -20 "$DIR/apt.log" >&2; die "apt-get install failed (log: $DIR/apt.log)"; }
}

# ----------------------------------------------------------------------------- configs

# Write $2 into file $1 only when the content differs; return 0 when it changed.
write_if_changed() {
    local path="$1" content="$2" mode="${3:-644}"
    if [[ -f "$path" ]] && [[ "$(cat "$path")" == "$content" ]]; then
        return 1
    fi
    local tmp
    tmp="$(mktemp "$path.XXXXXX")"
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$path"
    return 0
}

write_configs() {
    mkdir -p "$ETC" "$DIR"/{state,spool,log,run}
    local cpus mem_mb node_lines="" k
    cpus="${NANOCHAT_SLURM_CPUS:-$(( $(nproc) > 16 ? $(nproc) : 16 ))}"
    cpus=$(( cpus / NODES > 8 ? cpus / NODES : 8 ))
    # RealMemory below the machine's (slurmd refuses a node that claims more than it has), split.
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 / NODES ))
    for k in $(seq "$NODES"); do
        node_lines+="NodeName=n$k NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$(( PORT_BASE + k )) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"$'\n'
    done
    local changed=1
    write_if_changed "$ETC/slurm.conf" "# Written by sbatch/slurm_local.sh: a $NODES-node Slurm on localhost for tests.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# A requeued job waits cred_expire+1 s before it is eligible again (default 120 s); tests want it short.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Scheduling: run often, keep finished jobs briefly, requeue allowed.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MinJobAge=120
KillWait=10
JobRequeue=1
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
# Accounting: slurmdbd + MariaDB, so sacct (and submitit's state queries) work.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10
JobCompType=jobcomp/none
# Each node declares more CPUs than the machine has, so several small jobs run at once;
# config_overrides makes slurmd accept the declared (not the detected) resources. One slurmd per
# node on this host (slurmd -N nK), each on its own port.
SlurmdParameters=config_overrides
${node_lines}PartitionName=debug Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP" && changed=0
    write_if_changed "$ETC/cgroup.conf" "# Written by sbatch/slurm_local.sh. 22.05 has no 'disabled' cgroup plugin; v1 without systemd loads.
CgroupPlugin=cgroup/v1
IgnoreSystemd=yes" && changed=0
    # slurmdbd refuses a config readable by others.
    write_if_changed "$ETC/slurmdbd.conf" "# Written by sbatch/slurm_local.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db" 600 && changed=0
    chown root:root "$ETC/slurmdbd.conf" && chmod 600 "$ETC/slurmdbd.conf"
    return $changed
}

# ----------------------------------------------------------------------------- daemons

start_munge() {
    if pid_alive "$DIR/run/munged.pid" && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; fi
    fi
    chown -R munge:munge /etc/munge && chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    # If another munged already serves the default socket (e.g. the distro's service), use it.
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    runuser -u munge -- /usr/sbin/munged 9>&- || die "munged did not start (see /var/log/munge/munged.log)"
    # munged (running as munge) writes /run/munge/munged.pid; keep a copy with ours so `down` stops it.
    for _ in $(seq 25); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.2; done
    cp /run/munge/munged.pid "$DIR/run/munged.pid"
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "munge does not answer after starting munged"
}

db() { mysql --protocol=socket --socket="$DB_SOCK" -uroot "$@"; }

start_mariadb() {
    if pid_alive "$DIR/mysql/mysqld.pid" && db -e 'select 1' >/dev/null 2>&1; then return 0; fi
    mkdir -p "$DIR/mysql" /run/mysqld
    chown mysql:mysql "$DIR/mysql" /run/mysqld
    if [[ ! -d "$DIR/mysql/data/mysql" ]]; then
        log "initialising a private MariaDB datadir in $DIR/mysql/data"
        mkdir -p "$DIR/mysql/data" && chown mysql:mysql "$DIR/mysql/data"
        mariadb-install-db --user=mysql --datadir="$DIR/mysql/data" --auth-root-authentication-method=socket \
            --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 \
            || { tail -20 "$DIR/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    # mysqld_safe stays in the foreground and restarts mariadbd if it dies: run it in the background.
    nohup mysqld_safe --no-defaults --user=mysql --datadir="$DIR/mysql/data" --socket="$DB_SOCK" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$DIR/mysql/mysqld.pid" \
        --log-error="$DIR/mysql/mysqld.log" --skip-name-resolve >/dev/null 2>&1 9>&- &
    echo $! >"$DIR/run/mysqld_safe.pid"
    for _ in $(seq 150); do db -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
    db -e 'select 1' >/dev/null 2>&1 || { tail -20 "$DIR/mysql/mysqld.log" >&2; die "MariaDB did not come up (log: $DIR/mysql/mysqld.log)"; }
    db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
           CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
           FLUSH PRIVILEGES;" || die "could not create the slurm database user"
}

start_slurmdbd() {
    if pid_alive "$DIR/run/slurmdbd.pid" && sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; then return 0; fi
    pid_alive "$DIR/run/slurmdbd.pid" || slurmdbd 9>&- || die "slurmdbd did not start (log: $DIR/log/slurmdbd.log)"
    for _ in $(seq 150); do sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1 && break; sleep 0.2; done
    sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1 \
        || { tail -20 "$DIR/log/slurmdbd.log" >&2; die "slurmdbd does not answer (log: $DIR/log/slurmdbd.log)"; }
    # The cluster must be registered before slurmctld starts, or it keeps no accounting.
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
    fi
}

start_slurmctld() {
    pid_alive "$DIR/run/slurmctld.pid" && return 0
    slurmctld 9>&- || die "slurmctld did not start (log: $DIR/log/slurmctld.log)"
}

node_names() { local k; for k in $(seq "$NODES"); do echo "n$k"; done; }

start_slurmd() {
    local n
    for n in $(node_names); do
        pid_alive "$DIR/run/slurmd-$n.pid" && continue
        mkdir -p "$DIR/spool/$n"
        slurmd -N "$n" 9>&- || die "slurmd -N $n did not start (log: $DIR/log/slurmd-$n.log)"
    done
}

# Node names resolve to this host: a job's master address is its first node's name. /etc/hosts is
# rewritten in place (it is often a bind mount that cannot be replaced by a rename).
write_hosts() {
    local line="127.0.0.1 $(node_names | tr '\n' ' ')# nanochat-slurm-nodes" rest
    grep -qxF "$line" /etc/hosts 2>/dev/null && return 0
    rest="$(grep -v '# nanochat-slurm-nodes$' /etc/hosts 2>/dev/null)"
    printf '%s\n%s\n' "$rest" "$line" >/etc/hosts || die "cannot write /etc/hosts (node names must resolve)"
}

node_state() { sinfo -h -N -n "$1" -o %t 2>/dev/null | head -1; }

all_nodes_in() {   # all_nodes_in STATE... -> 0 when every node's state is one of them
    local n st
    for n in $(node_names); do
        st="$(node_state "$n")"
        [[ " $* " == *" $st "* ]] || return 1
    done
}

wait_usable() {
    local deadline=$(( SECONDS + TIMEOUT )) state=""
    local n ready
    while (( SECONDS < deadline )); do
        ready=1 state=""
        for n in $(node_names); do
            state+="$n=$(node_state "$n") "
            case "$(node_state "$n")" in
                idle|mix|alloc|comp|idle~|mix-|alloc-) ;;
                down*|drain*|drng*|fail*|inval*)
                    # A node that was stopped or reconfigured comes back DOWN: it is ours, resume it.
                    ready=0; scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true ;;
                *) ready=0 ;;
            esac
        done
        if (( ready )) && sacct -n -X -S now-1minutes -o jobid >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log "node states: '${state:-none}' after ${TIMEOUT}s"
    for f in slurmctld slurmdbd $(node_names | sed 's/^/slurmd-/'); do log "--- tail of $DIR/log/$f.log"; tail -8 "$DIR/log/$f.log" >&2 2>/dev/null; done
    die "Slurm did not become usable within ${TIMEOUT}s (nodes idle and sacct answering)"
}

all_up() {
    local n
    pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmdbd.pid" && pid_alive "$DIR/mysql/mysqld.pid" || return 1
    for n in $(node_names); do pid_alive "$DIR/run/slurmd-$n.pid" || return 1; done
    all_nodes_in idle mix alloc comp || return 1
    sacct -n -X -S now-1minutes -o jobid >/dev/null 2>&1
}

# ----------------------------------------------------------------------------- commands

stop_pidfile() {   # stop_pidfile NAME FILE: SIGTERM, wait up to 15 s, then SIGKILL
    local name="$1" file="$2" pid
    pid_alive "$file" || { rm -f "$file"; return 0; }
    pid="$(cat "$file")"
    kill "$pid" 2>/dev/null
    for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then log "$name ($pid) ignored SIGTERM: SIGKILL"; kill -9 "$pid" 2>/dev/null; fi
    rm -f "$file"
    log "stopped $name"
}

stop_slurmds() {   # every node's slurmd this script started, whatever the node count (and the one-node layout's)
    local f
    for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmd.pid"; do
        [[ -e "$f" ]] || continue
        f="${f##*/}"; stop_pidfile "${f%.pid}" "$DIR/run/$f"
    done
}

cmd_down() {
    stop_slurmds
    stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
    stop_pidfile slurmdbd "$DIR/run/slurmdbd.pid"
    # mariadbd first: on its clean exit mysqld_safe (a shell loop that ignores SIGTERM while it
    # waits) ends by itself instead of restarting it.
    stop_pidfile mariadbd "$DIR/mysql/mysqld.pid"
    stop_pidfile mysqld_safe "$DIR/run/mysqld_safe.pid"
    stop_pidfile munged "$DIR/run/munged.pid"
}

cmd_up() {
    local t0=$SECONDS
    [[ $(id -u) -eq 0 ]] || die "this script runs the Slurm daemons as root; run it as root (or with sudo)"
    mkdir -p "$DIR"/{log,run}
    if write_configs; then
        # The configs changed (first run, or a new CPU count): daemons running on the old ones restart.
        if pid_alive "$DIR/run/slurmctld.pid" || pid_alive "$DIR/run/slurmdbd.pid" \
           || compgen -G "$DIR/run/slurmd-*.pid" >/dev/null || pid_alive "$DIR/run/slurmd.pid"; then
            log "configuration changed: restarting the Slurm daemons"
            stop_slurmds
            stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
            stop_pidfile slurmdbd "$DIR/run/slurmdbd.pid"
        fi
    elif all_up; then
        log "already up ($NODES nodes on $HOST, $(sinfo -h -o '%C' | awk -F/ '{print $4}') CPUs declared)"
        return 0
    fi
    install_packages
    write_hosts
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    wait_usable
    log "up in $(( SECONDS - t0 ))s: nodes n[1-$NODES] on $HOST, cluster $CLUSTER, configs in $ETC, state in $DIR"
}

cmd_status() {
    local name file
    local nodes
    # the nodes that run (pid files), else the nodes this call would start
    nodes="$(cd "$DIR/run" 2>/dev/null && compgen -G 'slurmd-*.pid' | sed 's/\.pid$//' | sort -V)"
    pid_alive "$DIR/run/slurmd.pid" && nodes="slurmd $nodes"   # the one-node layout's, before a restart
    [[ -n "$nodes" ]] || nodes="$(node_names | sed 's/^/slurmd-/')"
    for name in munged mysqld mysqld_safe slurmdbd slurmctld $nodes; do
        file="$DIR/run/$name.pid"; [[ $name == mysqld ]] && file="$DIR/mysql/mysqld.pid"
        if pid_alive "$file"; then echo "$name: running (pid $(cat "$file"))"; else echo "$name: not running"; fi
    done
    if command -v sinfo >/dev/null && sinfo >/dev/null 2>&1; then
        sinfo -N -o '%N %t %C %m'
        squeue -o '%.14i %.9P %.24j %.8T %.10M %R'
    else
        echo "slurmctld: not answering"
        return 1
    fi
}

# `up` must not race with itself (several test sessions may call it at once): a lock on fd 9,
# which every daemon start closes (`9>&-`) so a daemon never inherits and holds the lock.
main() {
    local cmd="${1:-}"
    shift || true
    while (( $# )); do
        case "$1" in
            --nodes) NODES="${2:-}"; shift 2 || true ;;
            --nodes=*) NODES="${1#--nodes=}"; shift ;;
            *) echo "usage: $0 up|down|status [--nodes N]" >&2; exit 2 ;;
        esac
    done
    [[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { echo "error: --nodes / NANOCHAT_SLURM_NODES: '$NODES' is not a node count (1-99)" >&2; exit 2; }
    case "$cmd" in
        up|down)
            [[ $(id -u) -eq 0 ]] || die "this script runs the Slurm daemons as root; run it as root (or with sudo)"
            mkdir -p "$DIR"
            exec 9>"$DIR/.lock"
            flock -w 300 9 || die "another slurm_local.sh holds $DIR/.lock"
            if [[ "$cmd" == up ]]; then
                # Before apt has run there may be no configs to write: install first on a bare machine.
                if ! command -v slurmctld >/dev/null || ! command -v mysqld_safe >/dev/null || ! command -v munged >/dev/null \
                   || ! command -v slurmdbd >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
                    [[ $(id -u) -eq 0 ]] || die "Slurm is not installed and installing needs root"
                    install_packages
                fi
                cmd_up
            else
                cmd_down
            fi ;;
        status) cmd_status ;;
        *) echo "usage: $0 up|down|status [--nodes N]" >&2; exit 2 ;;
    esac
}

main "$@"
