#!/usr/bin/env bash
# `make stack-up` / `make stack-down`: the Swarm stack of deploy/stack.yml on this Docker engine.
#   bash deploy/stack.sh up      build the three images, make a one-node Swarm if the engine is in none,
#                                deploy the stack, return once every replica and the proxy answer /health
#   bash deploy/stack.sh down    remove the stack; leave the Swarm if `up` made it
# Settings (environment): the stack's own (deploy/stack.yml: CHARRNN_IMAGE, CHARRNN_REPLICAS, ...), and
#   CHARRNN_STACK (charrnn)       the stack's name
#   PYTHON_IMAGE, TORCH_INDEX_URL the app image's build arguments (the Dockerfile's; README "Docker")
#   DEBIAN_IMAGE                  the Debian bookworm base of the proxy and Prometheus images
#   CHARRNN_BUILD_APP (1)         0: use CHARRNN_IMAGE as it is (the docker tier's image, say)
#   CHARRNN_UP_TIMEOUT (600)      seconds `up` waits for the replicas
set -euo pipefail
cd "$(dirname "$0")/.."
stack=${CHARRNN_STACK:-charrnn}
export CHARRNN_IMAGE=${CHARRNN_IMAGE:-charrnn:latest}
export CHARRNN_PROXY_IMAGE=${CHARRNN_PROXY_IMAGE:-charrnn-proxy:latest}
export CHARRNN_PROMETHEUS_IMAGE=${CHARRNN_PROMETHEUS_IMAGE:-charrnn-prometheus:latest}
export CHARRNN_REPLICAS=${CHARRNN_REPLICAS:-3}
export CHARRNN_PROXY_PORT=${CHARRNN_PROXY_PORT:-8080}
# The node label that says this script made the Swarm (so that `down` leaves only a Swarm it made).
made_label=org.charrnn.stack-made-swarm

build() {
    local debian=${DEBIAN_IMAGE:-debian:bookworm-slim}
    if [ "${CHARRNN_BUILD_APP:-1}" != 0 ]; then
        DOCKER_BUILDKIT=0 docker build --network host \
            --build-arg PYTHON_IMAGE="${PYTHON_IMAGE:-python:3.11-slim-bookworm}" \
            --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
            -t "$CHARRNN_IMAGE" .
    fi
    docker image inspect "$CHARRNN_IMAGE" >/dev/null
    for part in proxy prometheus; do
        local image=CHARRNN_${part^^}_IMAGE
        DOCKER_BUILDKIT=0 docker build -q --network host --build-arg DEBIAN_IMAGE="$debian" \
            -f "deploy/$part/Dockerfile" -t "${!image}" deploy
    done
}

swarm() {
    if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
        # 127.0.0.1: a one-node Swarm needs no other address (and this machine may have none to offer).
        docker swarm init --advertise-addr 127.0.0.1 >/dev/null
        docker node update --label-add "$made_label=true" "$(docker info --format '{{.Swarm.NodeID}}')" >/dev/null
        echo "stack: made a one-node Swarm"
    fi
}

wait_healthy() {
    local deadline=$((SECONDS + ${CHARRNN_UP_TIMEOUT:-600})) slot
    until [ "$(docker service ls --filter "name=${stack}_app" --format '{{.Replicas}}')" = \
        "$CHARRNN_REPLICAS/$CHARRNN_REPLICAS" ] && healthy_slots && answers "$CHARRNN_PROXY_PORT"; do
        if [ $SECONDS -ge $deadline ]; then
            docker service ps --no-trunc "${stack}_app" >&2
            echo "stack: the replicas were not all healthy within ${CHARRNN_UP_TIMEOUT:-600} s" >&2
            exit 1
        fi
        sleep 2
    done
    echo "stack: $CHARRNN_REPLICAS replicas healthy; the proxy answers on port $CHARRNN_PROXY_PORT"
}

healthy_slots() {
    local slot
    for slot in $(seq "$CHARRNN_REPLICAS"); do
        answers "181$(printf %02d "$slot")" || return 1
    done
}

answers() {  # whether GET /health on 127.0.0.1:$1 answers 200
    python3 -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$1/health', timeout=30)" \
        2>/dev/null
}

down() {
    if docker stack ls --format '{{.Name}}' 2>/dev/null | grep -qx "$stack"; then
        docker stack rm "$stack" >/dev/null
        # `stack rm` returns at once; its containers stop (drain, then streams finish) after it.
        local deadline=$((SECONDS + 120))
        while [ -n "$(docker ps -q --filter "label=com.docker.stack.namespace=$stack")" ] && [ $SECONDS -lt $deadline ]; do
            sleep 1
        done
        # The stopped tasks' containers (Swarm keeps a few per slot as task history).
        docker ps -aq --filter "label=com.docker.stack.namespace=$stack" | xargs -r docker rm -f -v >/dev/null
        docker volume rm "${stack}_prometheus" >/dev/null 2>&1 || true
        echo "stack: removed $stack"
    fi
    if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" = active ] &&
        [ "$(docker node inspect self --format "{{index .Spec.Labels \"$made_label\"}}")" = true ] &&
        [ -z "$(docker stack ls --format '{{.Name}}')" ]; then
        docker swarm leave --force >/dev/null
        # Leaving keeps the bridge Swarm made for its containers; a later `docker swarm init` makes it again.
        docker network rm docker_gwbridge >/dev/null 2>&1 || true
        echo "stack: left the Swarm that stack-up made"
    fi
}

case "${1:-}" in
up)
    build
    swarm
    docker stack deploy --resolve-image never -c deploy/stack.yml "$stack"
    wait_healthy
    ;;
down) down ;;
*)
    echo "usage: bash deploy/stack.sh up|down" >&2
    exit 2
    ;;
esac
