#!/usr/bin/env bash
# A local multi-process Ray cluster on loopback, plus an MLflow tracking server, for trying the real
# `ray job submit` path on one machine.
#
#   cluster/local.sh up        # head node + one worker node + MLflow; writes $STATE_DIR/env.sh
#   source runs/local-cluster/env.sh
#   ray job submit --working-dir . --runtime-env platform/runtime/local.yaml -- python jobs/train.py ...
#   cluster/local.sh status    # what runs, where
#   cluster/local.sh down      # stops exactly what `up` started (nothing else)
#
# Everything listens on 127.0.0.1. Every port is overridable (defaults are chosen away from Ray's and
# MLflow's defaults, so this cluster can run beside a `ray.init()` or `make quickstart`):
#   PIXELLM_RAY_PORT=26379            GCS port of the head node
#   PIXELLM_RAY_DASHBOARD_PORT=28265  dashboard + job submission API (RAY_ADDRESS=http://127.0.0.1:PORT)
#   PIXELLM_RAY_CLIENT_PORT=20001     Ray Client server (ray://127.0.0.1:PORT)
#   PIXELLM_RAY_HEAD_AGENT_PORT=28266 / PIXELLM_RAY_WORKER_AGENT_PORT=28267  per-node dashboard agents
#   PIXELLM_MLFLOW_PORT=25000         MLflow tracking server (MLFLOW_TRACKING_URI=http://127.0.0.1:PORT)
# Sizes: PIXELLM_HEAD_CPUS=1, PIXELLM_WORKER_CPUS=2 (the worker also carries the custom resource
# `local_worker: 1`). Where: PIXELLM_CLUSTER_DIR=runs/local-cluster (state, Ray temp dir, MLflow store),
# PIXELLM_VENV=.venv (Ray is started from it, so a job's `python` resolves to the project venv).
#
# Safety: `down` never runs a bare `ray stop` (that stops every Ray on the machine). It stops, by pid,
# only the processes whose environment carries this cluster's marker (PIXELLM_LOCAL_CLUSTER=<dir>),
# which `up` sets for Ray and MLflow alone; Ray itself uses this cluster's own --temp-dir.
set -euo pipefail

case "${1:-}" in
  up | down | status) ;;
  *)
    echo "usage: cluster/local.sh up|down|status   (ports and sizes: see the header of this file)" >&2
    exit 2
    ;;
esac

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

CLUSTER_DIR="${PIXELLM_CLUSTER_DIR:-runs/local-cluster}"
mkdir -p "$CLUSTER_DIR"
CLUSTER_DIR="$(cd "$CLUSTER_DIR" && pwd)"
VENV="$(cd "${PIXELLM_VENV:-.venv}" 2>/dev/null && pwd)" || {
  echo "local.sh: no virtual environment at ${PIXELLM_VENV:-.venv}; run \`make env\` first" >&2
  exit 2
}
RAY_PORT="${PIXELLM_RAY_PORT:-26379}"
DASHBOARD_PORT="${PIXELLM_RAY_DASHBOARD_PORT:-28265}"
CLIENT_PORT="${PIXELLM_RAY_CLIENT_PORT:-20001}"
HEAD_AGENT_PORT="${PIXELLM_RAY_HEAD_AGENT_PORT:-28266}"
WORKER_AGENT_PORT="${PIXELLM_RAY_WORKER_AGENT_PORT:-28267}"
MLFLOW_PORT="${PIXELLM_MLFLOW_PORT:-25000}"
HEAD_CPUS="${PIXELLM_HEAD_CPUS:-1}"
WORKER_CPUS="${PIXELLM_WORKER_CPUS:-2}"

RAY_TMP="$CLUSTER_DIR/ray"
MLFLOW_PID_FILE="$CLUSTER_DIR/mlflow.pid"
ENV_FILE="$CLUSTER_DIR/env.sh"
LOG_DIR="$CLUSTER_DIR/logs"

# Ray from the project venv; Ray binds to 127.0.0.1 only with this set (see platform-facts.md).
export PATH="$VENV/bin:$PATH"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
# Token auth (Ray's default for `ray start --head`) with this cluster's own token file, so the
# cluster neither needs nor overwrites ~/.ray/auth_token. `ray job submit` reads the same two variables.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$CLUSTER_DIR/auth_token"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# Inherited by every Ray worker started by this cluster, so jobs find the cluster's MLflow server.
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"

log() { echo "local.sh: $*" >&2; }

port_open() {  # port_open PORT -> 0 if something listens on 127.0.0.1:PORT
  python - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(0.5)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
}

ensure_token() {  # a random token only this cluster uses (mode 600)
  [ -s "$RAY_AUTH_TOKEN_PATH" ] && return 0
  (umask 077 && python -c "from ray._private.authentication.authentication_token_generator import generate_new_authentication_token as g; print(g(), end='')" >"$RAY_AUTH_TOKEN_PATH")
}

# Every process this cluster starts carries PIXELLM_LOCAL_CLUSTER=<cluster dir> in its environment.
# Ray's Python agents and workers rename themselves with setproctitle ("ray::DashboardAgent"), which
# can overwrite their environment block, so their descendants of marked processes count too.
# `down` stops exactly those processes.
MARKER="PIXELLM_LOCAL_CLUSTER=$CLUSTER_DIR"

cluster_pids() {  # pids of processes started by this cluster (Ray and MLflow), with descendants
  local pid ppid rest marked="" all=""
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    if tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF -- "$MARKER"; then
      marked="$marked $pid"
    fi
  done
  [ -n "$marked" ] || return 0
  # pid -> parent pid table, then a breadth-first walk down from the marked processes.
  all="$(for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    read -r _ rest 2>/dev/null <"/proc/$pid/stat" || continue
    ppid="$(echo "${rest##*) }" | cut -d' ' -f2)"
    echo "$pid $ppid"
  done)"
  echo "$all" | awk -v seeds="$marked" '
    { parent[$1] = $2; kids[$2] = kids[$2] " " $1 }
    END {
      n = split(seeds, queue, " "); head = 1
      for (i = 1; i <= n; i++) seen[queue[i]] = 1
      while (head <= n) {
        p = queue[head++]; m = split(kids[p], k, " ")
        for (j = 1; j <= m; j++) if (!(k[j] in seen)) { seen[k[j]] = 1; queue[++n] = k[j] }
      }
      for (p in seen) if (p in parent) print p
    }'
}

ray_running() { [ -n "$(cluster_pids)" ] && port_open "$RAY_PORT"; }

mlflow_pid() {  # the recorded MLflow pid, if that process still runs
  [ -f "$MLFLOW_PID_FILE" ] || return 1
  local pid
  pid="$(cat "$MLFLOW_PID_FILE")"
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what="$2"
  shift 2
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "timed out waiting for $what (logs: $LOG_DIR, $RAY_TMP/session_latest/logs)"
      return 1
    fi
    sleep 0.5
  done
}

mlflow_healthy() {
  python - "$MLFLOW_PORT" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError:
    sys.exit(1)
PY
}

write_env() {
  cat >"$ENV_FILE" <<EOF
# Written by cluster/local.sh up; \`source\` it in the shell that submits jobs.
export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export PIXELLM_RAY_GCS_ADDRESS=127.0.0.1:$RAY_PORT
export PIXELLM_RAY_CLIENT_ADDRESS=ray://127.0.0.1:$CLIENT_PORT
export PATH="$VENV/bin:\$PATH"
EOF
}

up_ray() {
  if ray_running; then
    log "Ray already runs from $RAY_TMP (dashboard http://127.0.0.1:$DASHBOARD_PORT); not starting another"
    return 0
  fi
  local port
  for port in "$RAY_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" "$HEAD_AGENT_PORT" "$WORKER_AGENT_PORT"; do
    if port_open "$port"; then
      log "port 127.0.0.1:$port is taken by another program; pick free ports with PIXELLM_RAY_*_PORT"
      return 1
    fi
  done
  ensure_token
  log "starting Ray head on 127.0.0.1:$RAY_PORT (dashboard :$DASHBOARD_PORT, $HEAD_CPUS CPU)"
  env "$MARKER" ray start --head \
    --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --dashboard-agent-listen-port "$HEAD_AGENT_PORT" \
    --ray-client-server-port "$CLIENT_PORT" \
    --num-cpus "$HEAD_CPUS" --num-gpus 0 \
    --temp-dir "$RAY_TMP" --disable-usage-stats \
    >"$LOG_DIR/ray-head.log" 2>&1 || { cat "$LOG_DIR/ray-head.log" >&2; return 1; }
  log "starting Ray worker node ($WORKER_CPUS CPU, resource local_worker=1)"
  # Ray 2.60's `ray start --address` cannot join a loopback-only head as-is: with
  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it refuses ("multi-node clusters are not supported on Windows
  # and OSX"), and with =1 it rewrites the address 127.0.0.1 to the machine's network IP, where the
  # loopback-bound GCS does not listen. This launcher runs the same `ray start` CLI with exactly those
  # two behaviours switched off; every process it starts keeps RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and
  # --node-ip-address 127.0.0.1, so the worker node stays on loopback.
  # Supported alternatives checked (Ray 2.60) and why they do not do it: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
  # switches both behaviours together; --node-ip-address 127.0.0.1 is itself passed through
  # resolve_ip_for_localhost by `ray start`; ray.cluster_utils.Cluster starts nodes from a Python
  # driver (a test utility), not through the `ray start` CLI this script exists to exercise. The
  # patch is guarded: a missing attribute stops `up` naming the Ray version, and check_nodes fails
  # when any registered node is not on 127.0.0.1.
  env "$MARKER" python -c '
import sys
import ray
import ray._private.ray_constants as ray_constants
import ray._private.services as services
# Private Ray internals, checked on Ray 2.60 (pyproject pins the range): fail loudly when they move.
for module, name in ((ray_constants, "ENABLE_RAY_CLUSTER"), (services, "resolve_ip_for_localhost")):
    if not hasattr(module, name):
        sys.exit(f"local.sh: Ray {ray.__version__} has no {module.__name__}.{name}; the loopback "
                 "worker patch in cluster/local.sh was written for Ray 2.60 and must be updated")
ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
' start --address "127.0.0.1:$RAY_PORT" \
    --node-ip-address 127.0.0.1 \
    --dashboard-agent-listen-port "$WORKER_AGENT_PORT" \
    --num-cpus "$WORKER_CPUS" --num-gpus 0 --resources '{"local_worker": 1}' \
    --temp-dir "$RAY_TMP" \
    >"$LOG_DIR/ray-worker.log" 2>&1 || { cat "$LOG_DIR/ray-worker.log" >&2; return 1; }
  wait_for 60 "the Ray dashboard" port_open "$DASHBOARD_PORT"
  check_nodes
}

check_nodes() {  # both nodes registered, every one on 127.0.0.1; loud failure otherwise
  local rc deadline=$((SECONDS + 120))
  while :; do
    rc=0
    python - "$DASHBOARD_PORT" <<'PY' || rc=$?
import sys
import ray
from ray.util.state import list_nodes
try:
    nodes = [n for n in list_nodes(address=f"http://127.0.0.1:{sys.argv[1]}") if n.state == "ALIVE"]
except Exception as err:  # the dashboard is still starting
    print(f"local.sh: node list not ready: {err}", file=sys.stderr)
    sys.exit(1)
away = [f"{n.node_name or n.node_id}={n.node_ip}" for n in nodes if n.node_ip != "127.0.0.1"]
if away:
    print(f"local.sh: Ray {ray.__version__} put nodes off loopback ({', '.join(away)}); the "
          "loopback patch in cluster/local.sh no longer works with this Ray version", file=sys.stderr)
    sys.exit(3)
sys.exit(0 if len(nodes) >= 2 else 1)
PY
    [ "$rc" -eq 0 ] && return 0
    [ "$rc" -eq 3 ] && return 1
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "timed out waiting for the worker node to register (logs: $LOG_DIR/ray-worker.log)"
      return 1
    fi
    sleep 2
  done
}

up_mlflow() {
  if mlflow_pid >/dev/null; then
    log "MLflow already runs (pid $(cat "$MLFLOW_PID_FILE"), http://127.0.0.1:$MLFLOW_PORT)"
    return 0
  fi
  if port_open "$MLFLOW_PORT"; then
    log "port 127.0.0.1:$MLFLOW_PORT is taken by another program; set PIXELLM_MLFLOW_PORT"
    return 1
  fi
  mkdir -p "$CLUSTER_DIR/mlflow-artifacts"
  log "starting MLflow on 127.0.0.1:$MLFLOW_PORT (store $CLUSTER_DIR/mlflow.db)"
  # setsid: MLflow gets its own process group, so `down` stops the server and its workers together.
  # No MLflow background job workers (huey): the platform never uses them.
  env "$MARKER" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server \
    --backend-store-uri "sqlite:///$CLUSTER_DIR/mlflow.db" \
    --artifacts-destination "$CLUSTER_DIR/mlflow-artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    >"$LOG_DIR/mlflow.log" 2>&1 </dev/null &
  echo $! >"$MLFLOW_PID_FILE"
}

wait_mlflow() {
  wait_for 120 "MLflow /health" mlflow_healthy || { tail -n 30 "$LOG_DIR/mlflow.log" >&2; return 1; }
}

cmd_up() {
  mkdir -p "$LOG_DIR"
  up_mlflow # starts in the background while Ray comes up (each takes tens of seconds on 2 cores)
  up_ray
  wait_mlflow
  write_env
  log "up. Next: source $ENV_FILE"
  echo "$ENV_FILE"
}

cmd_down() {
  local pid pids deadline left=""
  pid="$(mlflow_pid || true)"
  if [ -n "$pid" ]; then
    log "stopping MLflow (process group $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$MLFLOW_PID_FILE"
  pids="$(cluster_pids)"
  if [ -n "$pids" ]; then
    log "stopping the processes of this cluster: $(echo $pids)"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    # Ray's agents can outlive their raylet and ignore SIGTERM: wait, then SIGKILL what is left of
    # the set found above (the walk cannot find orphans once their raylet is gone).
    deadline=$((SECONDS + 10))
    while [ "$SECONDS" -lt "$deadline" ]; do
      left=""
      for pid in $pids; do kill -0 "$pid" 2>/dev/null && left="$left $pid"; done
      [ -z "$left" ] && break
      sleep 0.3
    done
    # shellcheck disable=SC2086
    [ -z "$left" ] || kill -KILL $left 2>/dev/null || true
  fi
  rm -f "$ENV_FILE"
  log "down"
}

cmd_status() {
  local rc=0 pid
  echo "cluster dir:  $CLUSTER_DIR"
  if ray_running; then
    echo "ray:          up  gcs 127.0.0.1:$RAY_PORT  dashboard http://127.0.0.1:$DASHBOARD_PORT  client ray://127.0.0.1:$CLIENT_PORT"
    ray status --address "127.0.0.1:$RAY_PORT" 2>/dev/null | sed -n '/Resources/,$p' || true
  else
    echo "ray:          down"
    rc=3
  fi
  if pid="$(mlflow_pid)" && mlflow_healthy; then
    echo "mlflow:       up  http://127.0.0.1:$MLFLOW_PORT  (pid $pid)"
  else
    echo "mlflow:       down"
    rc=3
  fi
  [ -f "$ENV_FILE" ] && echo "env file:     $ENV_FILE"
  return "$rc"
}

case "$1" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
esac
