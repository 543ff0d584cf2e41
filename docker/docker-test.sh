#!/usr/bin/env bash
# Build the image, run it, and ask it the seed's two questions: `make docker-test`.
#
# With podman (no Docker engine here; image registries unreachable): the base image is a local debootstrap
# of Debian bookworm (docker/make-base-image.sh, made once and reused), torch comes from the local wheel
# directory through a build volume, everything else from PyPI. With docker, the Dockerfile's defaults
# (python:3.11-slim, PyTorch's CPU index) are used.
#
# Steps: build (timed) -> run detached on 127.0.0.1:PORT -> wait for /health -> POST /generate/custom and
# /generate/gpt2 with curl -> check them (custom: 200, generated_text starts with the prompt; gpt2: 503 with
# a JSON message) -> check the custom model's decode step (/ready: the C step; eager when built with C_COMPILER=) ->
# check the HEALTHCHECK, the non-root user and the CPU-only torch -> report image size
# and build time -> remove the container. Results go to $RESULTS (JSON) for tests/test_docker.py.
#
# Environment (all optional):
#   ENGINE=podman|docker  IMAGE=tiny-llm  BASE_IMAGE=localhost/tinyllm-base:bookworm (podman)
#   WHEELS=/opt/wheels    TRAIN_MINUTES=2  TRAIN_ARGS=  CHECKPOINT=<run or checkpoint dir to ship instead>
#   PORT=<free port>      NO_CACHE=1 (build from scratch)  SKIP_BUILD=1 (test the existing image)
#   HEALTH_TIMEOUT=300    KEEP=1 (leave the container running)  RESULTS=test-artifacts/docker/results.json
#   C_COMPILER=           (the Dockerfile's build arg, gcc by default: empty builds the image without a compiler)
#   EXPECT_DECODE_STEP    (what /ready must name as the custom model's decode step: c, or eager with C_COMPILER=)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [[ -z "${ENGINE:-}" ]]; then
    if command -v podman >/dev/null; then ENGINE=podman
    elif command -v docker >/dev/null; then
        docker info >/dev/null 2>&1 || { echo "docker-test: docker is installed but its daemon is not running (start it, or install podman)" >&2; exit 2; }
        ENGINE=docker
    else echo "docker-test: neither podman nor docker is installed (apt-get install podman buildah debootstrap runc)" >&2; exit 2
    fi
fi
IMAGE=${IMAGE:-tiny-llm}
TRAIN_MINUTES=${TRAIN_MINUTES:-2}
TRAIN_ARGS=${TRAIN_ARGS:-}
WHEELS=${WHEELS:-/opt/wheels}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-300}
if [[ -n "${C_COMPILER-gcc}" ]]; then EXPECT_DECODE_STEP=${EXPECT_DECODE_STEP:-c}; else EXPECT_DECODE_STEP=${EXPECT_DECODE_STEP:-eager}; fi
RESULTS=${RESULTS:-$ROOT/test-artifacts/docker/results.json}
PROMPT="The future of AI is"
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
NAME="tinyllm-docker-test-$$"
LOGDIR=$(dirname "$RESULTS")
mkdir -p "$LOGDIR"
BUILD_LOG="$LOGDIR/build.log"
RUN_LOG="$LOGDIR/container.log"

log() { printf '\n== %s\n' "$*"; }

build_args=(--build-arg "TRAIN_MINUTES=$TRAIN_MINUTES" --build-arg "TRAIN_ARGS=$TRAIN_ARGS")
run_args=()
if [[ $ENGINE == podman ]]; then
    BASE_IMAGE=${BASE_IMAGE:-localhost/tinyllm-base:bookworm}
    if [[ $BASE_IMAGE == localhost/* ]]; then
        log "base image $BASE_IMAGE"
        docker/make-base-image.sh "$BASE_IMAGE"
    fi
    # chroot isolation (no nested container runtime needed to build); docker format keeps HEALTHCHECK.
    build_args+=(--isolation chroot --format docker --build-arg "BASE_IMAGE=$BASE_IMAGE")
    if [[ -d $WHEELS ]]; then
        build_args+=(-v "$WHEELS:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_EXTRA_INDEX_URL=)
    fi
    run_args+=(--runtime runc --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
elif [[ -n "${BASE_IMAGE:-}" ]]; then
    build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
fi
[[ -n "${C_COMPILER+set}" ]] && build_args+=(--build-arg "C_COMPILER=$C_COMPILER")
[[ "${NO_CACHE:-0}" == 1 ]] && build_args+=(--no-cache)

# A checkpoint to ship instead of training: staged in docker/checkpoint/ (git-ignored) for the build only.
staged=""
cleanup() {
    local rc=$?
    if [[ "${KEEP:-0}" != 1 ]]; then $ENGINE rm -f "$NAME" >/dev/null 2>&1 || true; fi
    if [[ -n $staged ]]; then rm -rf "$staged"; fi
    exit "$rc"
}
trap cleanup EXIT
if [[ -n "${CHECKPOINT:-}" ]]; then
    [[ -d $CHECKPOINT ]] || { echo "docker-test: CHECKPOINT=$CHECKPOINT is not a directory" >&2; exit 2; }
    staged="$ROOT/docker/checkpoint/staged"
    rm -rf "$staged"
    cp -r "$CHECKPOINT" "$staged"
fi

build_seconds=null
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "$ENGINE build -t $IMAGE . (log: $BUILD_LOG)"
    start=$(date +%s)
    if ! $ENGINE build "${build_args[@]}" -t "$IMAGE" . 2>&1 | tee "$BUILD_LOG"; then
        echo "docker-test: build failed (see $BUILD_LOG)" >&2
        exit 1
    fi
    build_seconds=$(($(date +%s) - start))
fi
if [[ -n $staged ]]; then rm -rf "$staged"; staged=""; fi
size_bytes=$($ENGINE image inspect --format '{{.Size}}' "$IMAGE")
size_mb=$((size_bytes / 1000000))

log "$ENGINE run -d -p 127.0.0.1:$PORT:5000 $IMAGE"
# (Podman without systemd logs "unable to get systemd connection to add healthchecks": harmless, it only
# means no periodic health timer; `podman healthcheck run` below runs the HEALTHCHECK on demand.)
$ENGINE run -d --name "$NAME" "${run_args[@]}" -p "127.0.0.1:$PORT:5000" "$IMAGE" >/dev/null
start=$(date +%s)
healthy=false
while (($(date +%s) - start < HEALTH_TIMEOUT)); do
    if [[ $($ENGINE inspect --format '{{.State.Running}}' "$NAME" 2>/dev/null) != true ]]; then
        echo "docker-test: the container stopped:" >&2
        $ENGINE logs "$NAME" >&2 || true
        break
    fi
    if curl -fsS --max-time 5 "http://127.0.0.1:$PORT/health" >"$LOGDIR/health.json" 2>/dev/null; then
        healthy=true
        break
    fi
    sleep 2
done
startup_seconds=$(($(date +%s) - start))
echo "health after ${startup_seconds}s: $healthy $(cat "$LOGDIR/health.json" 2>/dev/null || true)"

# /health is liveness; the models load behind it. Wait until none is still "loading" (per /ready), so the
# requests below meet the models' settled state: GPT-2's load from the hub fails here and answers 503.
settled() {
    curl -sS --max-time 5 "http://127.0.0.1:$PORT/ready" >"$LOGDIR/ready.json" 2>/dev/null || true
    python3 -c 'import json, sys
models = json.load(open(sys.argv[1])).get("models", {})
sys.exit(0 if models and all(m.get("state") != "loading" for m in models.values()) else 1)' "$LOGDIR/ready.json" 2>/dev/null
}
if $healthy; then
    while (($(date +%s) - start < HEALTH_TIMEOUT)) && ! settled; do sleep 2; done
    echo "ready after $(($(date +%s) - start))s: $(cat "$LOGDIR/ready.json" 2>/dev/null || true)"
fi

# The custom model's batch-1 decode step builds in the background once it has loaded (the C step: ~1-2 s when
# the image has a compiler, else it stays eager); /ready names it. The requests below then run through it.
decode_step=""
if $healthy; then
    for _ in $(seq 30); do
        curl -sS --max-time 5 "http://127.0.0.1:$PORT/ready" >"$LOGDIR/ready.json" 2>/dev/null || true
        decode_step=$(python3 -c 'import json, sys
print(json.load(open(sys.argv[1]))["models"]["custom"].get("decode_step", ""))' "$LOGDIR/ready.json" 2>/dev/null || true)
        [[ $decode_step == "$EXPECT_DECODE_STEP" ]] && break
        sleep 2
    done
    echo "custom model's decode step: ${decode_step:-unknown} (expected: $EXPECT_DECODE_STEP)"
fi

ask() {  # ask ROUTE -> prints the status code; the body lands in $LOGDIR/ROUTE.json
    local route=$1
    echo "\$ curl -X POST http://localhost:$PORT/generate/$route -H 'Content-Type: application/json' -d '{\"prompt\": \"$PROMPT\"}'" >&2
    curl -sS --max-time 300 -o "$LOGDIR/$route.json" -w '%{http_code}' -X POST "http://localhost:$PORT/generate/$route" \
        -H 'Content-Type: application/json' -d "{\"prompt\": \"$PROMPT\"}" || true
}
custom_status=000 gpt2_status=000
if $healthy; then
    log "the seed's two requests"
    custom_status=$(ask custom); echo "HTTP $custom_status $(cat "$LOGDIR/custom.json")"
    gpt2_status=$(ask gpt2); echo "HTTP $gpt2_status $(cat "$LOGDIR/gpt2.json")"
fi

healthcheck=false uid="" torch_cuda=""
if $healthy; then
    # Podman runs HEALTHCHECK on demand; docker reports the state of its own periodic runs.
    if [[ $ENGINE == podman ]]; then
        $ENGINE healthcheck run "$NAME" >/dev/null 2>&1 && healthcheck=true
    else
        for _ in $(seq 60); do
            state=$($ENGINE inspect --format '{{.State.Health.Status}}' "$NAME" 2>/dev/null || true)
            [[ $state == healthy ]] && { healthcheck=true; break; }
            sleep 5
        done
    fi
    uid=$($ENGINE exec "$NAME" id -u)
    torch_cuda=$($ENGINE exec "$NAME" python -c 'import torch; print(torch.__version__, torch.version.cuda)')
fi
$ENGINE logs "$NAME" >"$RUN_LOG" 2>&1 || true

rc=0
python3 - "$RESULTS" <<PY || rc=$?
import json, pathlib, sys

def body(name):
    try:
        return json.loads(pathlib.Path("$LOGDIR", name + ".json").read_text())
    except (OSError, ValueError):
        return None

prompt = "$PROMPT"
custom, gpt2 = body("custom"), body("gpt2")
custom_ok = $custom_status == 200 and isinstance(custom, dict) and str(custom.get("generated_text", "")).startswith(prompt)
detail = gpt2.get("detail") if isinstance(gpt2, dict) else None
gpt2_ok = $gpt2_status == 503 and isinstance(detail, str) and "gpt2" in detail.lower() and len(detail) > 20
results = {
    "engine": "$ENGINE", "image": "$IMAGE", "base_image": "${BASE_IMAGE:-python:3.11-slim}",
    "build_seconds": $build_seconds, "image_bytes": $size_bytes, "healthy": "$healthy" == "true",
    "startup_seconds": $startup_seconds, "healthcheck": "$healthcheck" == "true",
    "uid": int("$uid") if "$uid".isdigit() else None, "torch": "$torch_cuda",
    "decode_step": "$decode_step", "expected_decode_step": "$EXPECT_DECODE_STEP",
    "custom": {"status": $custom_status, "body": custom, "ok": custom_ok},
    "gpt2": {"status": $gpt2_status, "body": gpt2, "ok": gpt2_ok},
}
results["passed"] = bool(
    results["healthy"] and custom_ok and gpt2_ok and results["healthcheck"]
    and results["uid"] not in (None, 0) and results["torch"].endswith(" None")
    and results["decode_step"] == results["expected_decode_step"]
)
pathlib.Path(sys.argv[1]).write_text(json.dumps(results, indent=2) + "\n")
print(json.dumps({k: results[k] for k in ("healthy", "healthcheck", "uid", "torch", "decode_step", "passed")}))
sys.exit(0 if results["passed"] else 1)
PY
log "image $IMAGE: ${size_mb} MB; build: ${build_seconds}s; startup to /health: ${startup_seconds}s; results: $RESULTS"
exit $rc
