#!/bin/sh
# Writes Prometheus' configuration to /tmp/prometheus.yml (the root file system is read-only) and runs it.
# Targets: CHARRNN_SCRAPE_TARGETS (host:port, space- or comma-separated) when set; else every Swarm task
# slot's port, 127.0.0.1:${CHARRNN_APP_PORT_PREFIX}01 ... NN (deploy/stack.yml's replicas listen there on the
# host's network). Swarm's own service discovery (dockerswarm_sd_configs, role tasks) lists no task that
# uses the host's network, and Docker's DNS (tasks.app) has no entry for one; a slot without a replica is
# simply `up 0`, which the recording rules leave out.
set -eu
if [ -n "${CHARRNN_SCRAPE_TARGETS:-}" ]; then
    targets=$(echo "$CHARRNN_SCRAPE_TARGETS" | tr ',' ' ')
else
    targets=""
    slot=1
    while [ "$slot" -le "$CHARRNN_MAX_SLOTS" ]; do
        targets="$targets 127.0.0.1:${CHARRNN_APP_PORT_PREFIX}$(printf %02d "$slot")"
        slot=$((slot + 1))
    done
fi
{
    echo "global:"
    echo "  scrape_interval: ${CHARRNN_SCRAPE_INTERVAL}"
    echo "  evaluation_interval: ${CHARRNN_SCRAPE_INTERVAL}"
    echo "rule_files: [/etc/charrnn/rules.yml]"
    echo "scrape_configs:"
    echo "  - job_name: charrnn"
    echo "    metrics_path: /metrics"
    echo "    static_configs:"
    echo "      - targets:"
    for target in $targets; do
        echo "          - \"$target\""
    done
    echo "  - job_name: prometheus"
    echo "    static_configs:"
    echo "      - targets: [\"127.0.0.1:${CHARRNN_PROMETHEUS_PORT}\"]"
} >/tmp/prometheus.yml
promtool check config /tmp/prometheus.yml >&2
exec prometheus --config.file=/tmp/prometheus.yml --storage.tsdb.path=/prometheus \
    --storage.tsdb.retention.time="${CHARRNN_RETENTION}" \
    --web.listen-address="${CHARRNN_PROMETHEUS_BIND}:${CHARRNN_PROMETHEUS_PORT}" \
    --web.console.templates=/usr/share/prometheus/web/consoles \
    --web.console.libraries=/usr/share/prometheus/web/console_libraries
