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
conf=/etc/charrnn/nginx-main.conf
nginx -t -q -c "$conf"
if [ -z "${CHARRNN_UPSTREAM:-}" ]; then
    exec nginx -c "$conf"
fi

# Upstreams by name (docker-compose's `serve:8000`): nginx looks a name up only when it loads its
# configuration, and a recreated container comes back at a new address, so every 2 s the names are looked
# up again and nginx reloads when an address changed (a graceful reload: requests and streams in flight
# finish on the old workers). The signals `docker stop` and Kubernetes send go on to nginx.
addresses() {
    for address in $(echo "$CHARRNN_UPSTREAM" | tr ',' ' '); do
        getent ahosts "${address%:*}" | awk '{print $1}'
    done | sort -u | tr '\n' ' '
}
nginx -c "$conf" &
nginx_pid=$!
trap 'kill -QUIT "$nginx_pid"; wait "$nginx_pid"; exit 0' QUIT
trap 'kill -TERM "$nginx_pid"; wait "$nginx_pid"; exit 0' TERM INT
known=$(addresses)
while kill -0 "$nginx_pid" 2>/dev/null; do
    sleep 2 &
    wait $!
    now=$(addresses)
    if [ -n "$now" ] && [ "$now" != "$known" ] && nginx -t -q -c "$conf" 2>/dev/null; then
        echo "charrnn-proxy: upstream addresses now $now; reloading nginx" >&2
        known=$now
        nginx -s reload -c "$conf"
    fi
done
wait "$nginx_pid"
