#!/bin/sh
# Renders deploy/nginx.conf into /tmp/nginx/charrnn.conf, then runs nginx in the foreground.
# The upstream servers: CHARRNN_UPSTREAM (host:port, space- or comma-separated) when set; else one per
# Swarm task slot, 127.0.0.1:${CHARRNN_APP_PORT_PREFIX}01 ... ${CHARRNN_APP_PORT_PREFIX}NN (NN up to
# CHARRNN_MAX_SLOTS), where deploy/stack.yml's replicas listen. A slot with no replica refuses the
# connection at once, and nginx skips it for a few seconds (max_fails=1 fail_timeout=2s).
set -eu
mkdir -p /tmp/nginx
servers=""
if [ -n "${CHARRNN_UPSTREAM:-}" ]; then
    for address in $(echo "$CHARRNN_UPSTREAM" | tr ',' ' '); do
        servers="${servers}server ${address} max_fails=1 fail_timeout=2s; "
    done
else
    slot=1
    while [ "$slot" -le "$CHARRNN_MAX_SLOTS" ]; do
        servers="${servers}server 127.0.0.1:${CHARRNN_APP_PORT_PREFIX}$(printf %02d "$slot") max_fails=1 fail_timeout=2s; "
        slot=$((slot + 1))
    done
fi
export CHARRNN_UPSTREAM_SERVERS="$servers"
envsubst '${CHARRNN_UPSTREAM_SERVERS} ${CHARRNN_PROXY_PORT}' \
    </etc/charrnn/charrnn.conf.template >/tmp/nginx/charrnn.conf
nginx -t -q -c /etc/charrnn/nginx-main.conf
exec nginx -c /etc/charrnn/nginx-main.conf
