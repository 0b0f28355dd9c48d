#!/usr/bin/env bash
# Install Loftey on a cluster node, and start, stop or check its services on the head node.
#
# Usage: bash infra/loftey-services.sh install|start|stop|status
#
#   install  (every node) create the virtual environment, install Rust when cargo is
#            missing, install this repository editable, and prepare the model folder,
#            so that every node has the checkpoint at the same path.
#   start    (head node) stop running services, then start the tokenizer, forward and
#            orchestrator services in the background. The forward service first waits
#            until the cluster offers one unit of LOFTEY_EXPERT_RESOURCE per expert group.
#   stop     (head node) send SIGTERM to the services, then SIGKILL after LOFTEY_STOP_TIMEOUT.
#   status   (head node) print `ray status` and the gRPC health of each service.
#
# Settings (environment variables, with their defaults):
#   LOFTEY_VENV              ~/loftey-venv  virtual environment; empty (or missing) uses python3 on PATH
#   LOFTEY_RAY_VERSION       (unset)        install exactly this Ray, e.g. 2.60.0
#   LOFTEY_PIP_ARGS          --extra-index-url https://download.pytorch.org/whl/cpu (CPU torch)
#   LOFTEY_MODEL             tiny           tiny, dummy-235m or a checkpoint folder present on every node
#   LOFTEY_EXPERT_GROUPS     2              expert groups G (a divisor of the model's 4 experts)
#   LOFTEY_EXPERT_RESOURCE   expert_node    custom Ray resource the worker nodes offer
#   LOFTEY_DTYPE             float32        float32 or bfloat16
#   LOFTEY_HOST              127.0.0.1      address the public orchestrator binds; 0.0.0.0 for all
#   LOFTEY_PORT              50051          public loftey.v1.Generation port
#   LOFTEY_METRICS_PORT      9464           Prometheus metrics port of the orchestrator
#   LOFTEY_TOKENIZER_PORT    50052          tokenizer service port (bound on 127.0.0.1)
#   LOFTEY_FORWARD_PORT      50053          forward service port (bound on 127.0.0.1)
#   LOFTEY_FORWARD_ARGS      (empty)        extra `loftey serve forward` options, e.g. "--max-restarts 0"
#   LOFTEY_ORCHESTRATOR_ARGS (empty)        extra `loftey serve orchestrator` options, e.g. TLS and token
#   LOFTEY_HEALTH_TLS_CA     (empty)        PEM CA for `status` to check a public port that serves TLS
#   LOFTEY_RUN_DIR           ~/loftey-run   logs and pid files
#   LOFTEY_WORKER_TIMEOUT    3600           seconds the forward service waits for worker nodes
#   LOFTEY_STOP_TIMEOUT      30             seconds a service gets to exit after SIGTERM
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
LOFTEY_HOME=$(dirname "$(dirname "$SCRIPT")")
LOFTEY_VENV=${LOFTEY_VENV-$HOME/loftey-venv}
LOFTEY_PIP_ARGS=${LOFTEY_PIP_ARGS---extra-index-url https://download.pytorch.org/whl/cpu}
LOFTEY_MODEL=${LOFTEY_MODEL:-tiny}
LOFTEY_EXPERT_GROUPS=${LOFTEY_EXPERT_GROUPS:-2}
LOFTEY_EXPERT_RESOURCE=${LOFTEY_EXPERT_RESOURCE:-expert_node}
LOFTEY_DTYPE=${LOFTEY_DTYPE:-float32}
LOFTEY_HOST=${LOFTEY_HOST:-127.0.0.1}
LOFTEY_PORT=${LOFTEY_PORT:-50051}
LOFTEY_METRICS_PORT=${LOFTEY_METRICS_PORT:-9464}
LOFTEY_TOKENIZER_PORT=${LOFTEY_TOKENIZER_PORT:-50052}
LOFTEY_FORWARD_PORT=${LOFTEY_FORWARD_PORT:-50053}
LOFTEY_FORWARD_ARGS=${LOFTEY_FORWARD_ARGS:-}
LOFTEY_ORCHESTRATOR_ARGS=${LOFTEY_ORCHESTRATOR_ARGS:-}
LOFTEY_HEALTH_TLS_CA=${LOFTEY_HEALTH_TLS_CA:-}
LOFTEY_RUN_DIR=${LOFTEY_RUN_DIR:-$HOME/loftey-run}
LOFTEY_WORKER_TIMEOUT=${LOFTEY_WORKER_TIMEOUT:-3600}
LOFTEY_STOP_TIMEOUT=${LOFTEY_STOP_TIMEOUT:-30}
SERVICES=(tokenizer forward orchestrator)
# Tenths of a second start waits for the services' pid files, all together.
PID_FILE_TIMEOUT_TENTHS=300

# install creates the virtual environment. The other commands use python3 on PATH when it is missing.
if [[ -n $LOFTEY_VENV && ( -x $LOFTEY_VENV/bin/python || ${1:-} == install ) ]]; then
    PYTHON=$LOFTEY_VENV/bin/python
else
    PYTHON=$(command -v python3) || { echo "loftey-services: python3 not found on PATH" >&2; exit 1; }
fi
# One torch thread per process and passive OpenMP waits: the services share the head's cores.
# Ray starts worker processes at nice +15 unless RAY_worker_niceness sets another value.
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE RAY_worker_niceness=0

log() { echo "loftey-services: $*" >&2; }

install() {
    if [[ -n $LOFTEY_VENV && ! -x $PYTHON ]]; then
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || { log "python3 is $(python3 --version 2>&1); Loftey needs Python 3.11 or newer"; exit 1; }
        python3 -m venv "$LOFTEY_VENV"
    fi
    export PATH=$HOME/.cargo/bin:$PATH
    if ! command -v cargo >/dev/null; then
        command -v cc >/dev/null || { log "no C compiler (cc) found: install build-essential or gcc first"; exit 1; }
        log "installing Rust (rustup, minimal profile) to build the sampler extension"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    fi
    local ray_requirement=()
    if [[ -n ${LOFTEY_RAY_VERSION:-} ]]; then
        ray_requirement=("ray[default]==$LOFTEY_RAY_VERSION")
    fi
    # shellcheck disable=SC2086 # LOFTEY_PIP_ARGS holds several words
    "$PYTHON" -m pip install $LOFTEY_PIP_ARGS -e "$LOFTEY_HOME" "${ray_requirement[@]}"
    if [[ -n $LOFTEY_VENV ]] && ! grep -qs "$LOFTEY_VENV/bin" "$HOME/.bashrc"; then
        # `ray up`, `ray exec` and `ray attach` run their commands in interactive login shells.
        echo "export PATH=\"$LOFTEY_VENV/bin:\$PATH\"" >>"$HOME/.bashrc"
    fi
    log "model folder: $(model_dir)"
}

model_dir() {
    # Prepares the folder on first use (tiny is expanded, dummy-235m written) and prints its absolute path.
    "$PYTHON" -c 'import sys; from loftey.launcher import resolve_model_dir; print(resolve_model_dir(sys.argv[1]).resolve())' \
        "$LOFTEY_MODEL"
}

wait_for_expert_resource() {
    "$PYTHON" - "$LOFTEY_EXPERT_RESOURCE" "$LOFTEY_EXPERT_GROUPS" "$LOFTEY_WORKER_TIMEOUT" <<'EOF'
import sys
import time

import ray

resource, groups, timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address="auto", logging_level="WARNING")
deadline = time.monotonic() + timeout_s
while (offered := ray.cluster_resources().get(resource, 0)) < groups:
    if time.monotonic() > deadline:
        sys.exit(f"the cluster offers {offered:g} {resource} after {timeout_s:g} s, {groups} needed: are the workers up (ray status)?")
    print(f"waiting for worker nodes: {offered:g} of {groups} {resource} offered", flush=True)
    time.sleep(10)
EOF
}

run_service() {
    # Runs in the background process that start launched, and replaces itself with the service.
    local name=$1
    echo $$ >"$LOFTEY_RUN_DIR/$name.pid"
    case $name in
        tokenizer)
            exec "$PYTHON" -m loftey.tokenizer --model "$LOFTEY_MODEL_DIR" \
                --host 127.0.0.1 --port "$LOFTEY_TOKENIZER_PORT" ;;
        forward)
            wait_for_expert_resource
            # shellcheck disable=SC2086 # LOFTEY_FORWARD_ARGS holds several words
            exec "$PYTHON" -m loftey.forward --model "$LOFTEY_MODEL_DIR" \
                --host 127.0.0.1 --port "$LOFTEY_FORWARD_PORT" \
                --ray-address auto --expert-groups "$LOFTEY_EXPERT_GROUPS" --dtype "$LOFTEY_DTYPE" \
                --expert-resource "$LOFTEY_EXPERT_RESOURCE" --placement-strategy SPREAD \
                $LOFTEY_FORWARD_ARGS ;;
        orchestrator)
            # shellcheck disable=SC2086 # LOFTEY_ORCHESTRATOR_ARGS holds several words
            exec "$PYTHON" -m loftey.orchestrator \
                --tokenizer "127.0.0.1:$LOFTEY_TOKENIZER_PORT" --forward "127.0.0.1:$LOFTEY_FORWARD_PORT" \
                --host "$LOFTEY_HOST" --port "$LOFTEY_PORT" --metrics-port "$LOFTEY_METRICS_PORT" \
                $LOFTEY_ORCHESTRATOR_ARGS ;;
        *)
            log "unknown service $name"; exit 2 ;;
    esac
}

start() {
    stop
    mkdir -p "$LOFTEY_RUN_DIR"
    LOFTEY_MODEL_DIR=$(model_dir)
    export LOFTEY_MODEL_DIR
    for name in "${SERVICES[@]}"; do
        # A session of its own, so the service outlives the SSH session that ran this script.
        setsid nohup bash "$SCRIPT" run "$name" >>"$LOFTEY_RUN_DIR/$name.log" 2>&1 </dev/null &
    done
    # Each service writes its pid file first thing. Waiting for them lets a stop that follows
    # at once find every service.
    local waited=0
    for name in "${SERVICES[@]}"; do
        while [[ ! -s $LOFTEY_RUN_DIR/$name.pid ]] && ((waited < PID_FILE_TIMEOUT_TENTHS)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        [[ -s $LOFTEY_RUN_DIR/$name.pid ]] || { log "$name wrote no pid file; see $LOFTEY_RUN_DIR/$name.log"; exit 1; }
    done
    log "started ${SERVICES[*]} on $LOFTEY_MODEL_DIR; logs in $LOFTEY_RUN_DIR"
    log "check with: bash $SCRIPT status"
}

stop() {
    local name pid waited
    for name in orchestrator forward tokenizer; do
        pid=$(cat "$LOFTEY_RUN_DIR/$name.pid" 2>/dev/null) || continue
        # The service leads its own process group (setsid). The group also contains the forward
        # service's wait for worker nodes while that wait runs.
        if kill -TERM -- "-$pid" 2>/dev/null; then
            waited=0
            while kill -0 "$pid" 2>/dev/null && ((waited < LOFTEY_STOP_TIMEOUT)); do
                sleep 1
                waited=$((waited + 1))
            done
            if kill -0 "$pid" 2>/dev/null; then
                log "$name (pid $pid) did not exit ${LOFTEY_STOP_TIMEOUT} s after SIGTERM; killing it"
            fi
            kill -KILL -- "-$pid" 2>/dev/null || true
            log "$name stopped"
        fi
        rm -f "$LOFTEY_RUN_DIR/$name.pid"
    done
}

status() {
    local public_host=$LOFTEY_HOST
    if [[ $public_host == 0.0.0.0 ]]; then
        public_host=127.0.0.1
    fi
    local public=("$public_host:$LOFTEY_PORT")
    if [[ -n $LOFTEY_HEALTH_TLS_CA ]]; then
        public=(--tls-ca "$LOFTEY_HEALTH_TLS_CA" --tls "$public_host:$LOFTEY_PORT")
    fi
    "$(dirname "$PYTHON")/ray" status || true
    "$PYTHON" "$LOFTEY_HOME/infra/check_health.py" \
        "127.0.0.1:$LOFTEY_TOKENIZER_PORT" "127.0.0.1:$LOFTEY_FORWARD_PORT" "${public[@]}"
}

case ${1:-} in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    run) run_service "$2" ;;
    *) echo "usage: bash $0 install|start|stop|status" >&2; exit 2 ;;
esac
