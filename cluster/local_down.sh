#!/usr/bin/env bash
# Stop the local segrl stack that cluster/local_up.sh started: the Ray head and the SeaweedFS
# server, each by the PID it recorded, and nothing else. `ray stop` is not used: it stops
# every Ray cluster of this user on the machine (a test run's, a benchmark's).
#
#   cluster/local_down.sh          # SEGRL_STACK_DIR as for local_up.sh (~/.segrl-stack)
#
# Safe to run any time: with nothing running it does nothing. The state dir (keys, token,
# S3 data, logs) stays; delete it to start afresh.
set -euo pipefail

STATE="${SEGRL_STACK_DIR:-$HOME/.segrl-stack}"
RAY_GRACE_S=10
WEED_GRACE_S=15

log() { printf 'local_down: %s\n' "$*" >&2; }

if [[ ! -d "$STATE" ]]; then
    log "nothing to stop (no $STATE)"
    exit 0
fi
STATE="$(cd "$STATE" && pwd -P)"
# setting <name>: its value in the stack.env local_up.sh wrote, empty when there is none.
setting() {
    [[ -f "$STATE/stack.env" ]] || return 0
    sed -n "s/^$1=//p" "$STATE/stack.env" | tail -n 1
}
# The same temp dir local_up.sh derives from the state dir.
RAY_TMP="/tmp/segrl-ray-$(id -u)-$(printf '%s' "$STATE" | cksum | cut -d' ' -f1)"

# alive <pid>: the process exists and is not a zombie.
alive() {
    local stat
    stat="$(ps -p "$1" -o stat= 2>/dev/null)" || return 1
    [[ -n "$stat" && "$stat" != Z* ]]
}

# wait_gone <pid> <seconds>
wait_gone() {
    local deadline=$((SECONDS + $2))
    while alive "$1"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# stop <name> <pidfile> <marker> <grace seconds>: SIGTERM the recorded PID if its command line
# has marker (a PID reused by an unrelated process is left alone), SIGKILL after the grace.
stop() {
    local name=$1 pidfile=$2 marker=$3 grace=$4 pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(<"$pidfile")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" \
        && [[ "$(ps -ww -p "$pid" -o args= 2>/dev/null || true)" == *"$marker"* ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_gone "$pid" "$grace"; then
            log "$name (pid $pid) still up ${grace}s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            if ! wait_gone "$pid" 10; then
                log "$name (pid $pid) could not be stopped"
                return 1
            fi
        fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

# Ray processes of this stack still running after `ray start --block` exited (its SIGTERM
# handler stops its children, and they all carry the stack's own temp dir on their command
# line). Only reported: this script signals nothing but the two PIDs local_up.sh recorded.
ray_leftovers() {
    ps -ww -eo pid=,comm=,args= | STACK_TMP="$RAY_TMP" awk '
        index($0, ENVIRON["STACK_TMP"]) && $2 ~ /^(raylet|gcs_server|python.*|ray::.*)$/ {
            print
        }'
}

status=0
stop "Ray head" "$STATE/ray.pid" "--temp-dir=$RAY_TMP" "$RAY_GRACE_S" || status=1
for ((i = 0; i < 50; i++)); do
    [[ -z "$(ray_leftovers)" ]] && break
    sleep 0.2
done
leftovers="$(ray_leftovers)"
if [[ -n "$leftovers" ]]; then
    log "Ray processes of this stack are still running:"
    printf '%s\n' "$leftovers" >&2
    status=1
fi

stop "SeaweedFS" "$STATE/weed.pid" "-dir=$STATE/s3" "$WEED_GRACE_S" || status=1
# weed leaves /tmp/seaweedfs-<service>-<port>.sock behind; only this stack's are removed.
for name in MASTER_PORT MASTER_GRPC_PORT VOLUME_PORT VOLUME_GRPC_PORT FILER_PORT \
    FILER_GRPC_PORT S3_PORT S3_GRPC_PORT ADMIN_PORT ADMIN_GRPC_PORT; do
    port="$(setting "$name")"
    [[ -n "$port" ]] || continue
    for sock in /tmp/seaweedfs-*-"$port".sock; do
        if [[ -S "$sock" && -O "$sock" ]]; then
            rm -f "$sock"
        fi
    done
done

if ((status == 0)); then
    log "stack stopped (state kept in $STATE)"
fi
exit "$status"
