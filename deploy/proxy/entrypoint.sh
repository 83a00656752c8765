#!/bin/sh
# Renders deploy/nginx.conf into /tmp/nginx/charrnn.conf, runs nginx, and keeps its upstream list true.
#
# The replicas: CHARRNN_UPSTREAM (host:port, space- or comma-separated; names are looked up, every address
# of a name is a replica) when set; else one per Swarm task slot, 127.0.0.1:${CHARRNN_APP_PORT_PREFIX}01 ...
# ${CHARRNN_APP_PORT_PREFIX}NN (NN up to CHARRNN_MAX_SLOTS), where deploy/stack.yml's replicas listen.
#
# Open-source nginx has no active health checks, so this script is one. Every CHARRNN_PROBE_INTERVAL
# seconds (2) it looks the names up again and asks each replica's /health (unless CHARRNN_PROBE=off), all
# at once, each with CHARRNN_PROBE_TIMEOUT seconds (2). A replica that does not answer in time (hung, stopped, still loading:
# a starting Gunicorn's first connections wait in its backlog), refuses, or answers 5xx (503: draining
# after SIGTERM, or a model that does not generate) is marked `down`: nginx sends it no new request. No
# answer counts from the second probe in a row, so that a replica slow to answer once under load does not
# flap in and out (each change is a reload); a 5xx counts at once. Any other answer is up (/health answers
# whatever the Host). When every replica
# is down, all are listed as up: nginx then tries them in turn, and a request waits for a slow replica
# rather than getting a 502 at once. When the list changes, nginx reloads gracefully: requests and
# streams in flight finish on the old workers, and nginx still retries what got no byte on another replica
# (`proxy_next_upstream`, deploy/nginx.conf). What a replica was already answering when it hung is not
# saved by this: it waits until the replica dies (then nginx retries it, if it got no byte).
# The signals `docker stop` and Kubernetes send go on to nginx (SIGQUIT, the image's stop signal, is
# nginx's graceful stop).
set -eu
conf=/etc/charrnn/nginx-main.conf
rendered=/tmp/nginx/charrnn.conf
interval=${CHARRNN_PROBE_INTERVAL:-2}
timeout=${CHARRNN_PROBE_TIMEOUT:-2}
work=/tmp/nginx/probe
mkdir -p /tmp/nginx "$work"

# The candidate replicas, one host:port a line (IPv6 addresses in brackets): each name's addresses, sorted,
# in CHARRNN_UPSTREAM's order. A name given twice is listed twice (deploy/k8s/proxy.yaml lists a Service
# three times, so that nginx has another `server` to retry on).
candidates() {
    if [ -n "${CHARRNN_UPSTREAM:-}" ]; then
        for address in $(echo "$CHARRNN_UPSTREAM" | tr ',' ' '); do
            getent ahosts "${address%:*}" | awk '{ print $1 }' | sort -u | awk -v port="${address##*:}" '
                $1 ~ /:/ { print "[" $1 "]:" port; next } { print $1 ":" port }'
        done
    else
        slot=1
        while [ "$slot" -le "$CHARRNN_MAX_SLOTS" ]; do
            echo "127.0.0.1:${CHARRNN_APP_PORT_PREFIX}$(printf %02d "$slot")"
            slot=$((slot + 1))
        done
    fi
}

# Each candidate with its /health status code (000: no answer in time, or refused), "address code" a line;
# with CHARRNN_PROBE=off, "address -" (all up: behind a Kubernetes Service, whose readiness probes decide).
probe_all() {
    if [ "${CHARRNN_PROBE:-on}" = off ]; then
        for address in $1; do
            echo "$address -"
        done
        return
    fi
    pids=""
    n=0
    for address in $1; do
        n=$((n + 1))
        (code=$(curl -s -o /dev/null -m "$timeout" -H 'Host: localhost' -w '%{http_code}' \
            "http://$address/health" 2>/dev/null) || true
         echo "$address ${code:-000}" >"$work/$n") &
        pids="$pids $!"
    done
    for pid in $pids; do
        wait "$pid" || true
    done
    for i in $(seq 1 "$n"); do
        cat "$work/$i"
    done
    rm -f "$work"/*
}

# probe_all's lines with a "no answer" that the previous probe ($2, its lines) did not also see counted as
# up: a replica that does not answer is down from the second probe in a row (a 5xx is down at once).
confirmed() {
    printf '%s\n' "$2" >"$work.previous"
    echo "$1" | awk -v previous="$work.previous" '
        BEGIN { while ((getline line < previous) > 0) { split(line, f, " "); before[f[1]] = f[2] } }
        NF == 2 { print $1, ($2 == "000" && before[$1] != "000") ? "200" : $2 }'
}

# nginx's `server` lines from probe_all's lines: up, or `down`; all up when none is.
servers() {
    healthy=$(echo "$1" | awk 'NF == 2 && $2 != "000" && $2 !~ /^5/' | wc -l)
    echo "$1" | awk -v healthy="$healthy" 'NF == 2 {
        down = (healthy > 0 && ($2 == "000" || $2 ~ /^5/)) ? " down" : ""
        printf "server %s max_fails=1 fail_timeout=2s%s; ", $1, down
    }'
    # nginx needs one server at least: none resolves now (a name whose containers are all being replaced).
    [ -n "$(echo "$1" | awk 'NF == 2')" ] || printf 'server 127.0.0.1:9 down; '
}

# The upstream list in words, for the log: "address up" or "address down (503)".
describe() {
    echo "$1" | awk 'NF == 2 {
        bad = $2 == "000" || $2 ~ /^5/
        printf "%s%s %s", sep, $1, bad ? "down (" ($2 == "000" ? "no answer" : $2) ")" : "up"
        sep = ", "; n++; healthy += !bad
    } END { if (!healthy) printf "%s", n ? "; none is up, so all stay in the pool" : "none (no address)" }'
}

render() {
    CHARRNN_UPSTREAM_SERVERS="$1" envsubst '${CHARRNN_UPSTREAM_SERVERS} ${CHARRNN_PROXY_PORT}' \
        </etc/charrnn/charrnn.conf.template >"$2"
}

state=$(probe_all "$(candidates)")
render "$(servers "$state")" "$rendered"
nginx -t -q -c "$conf"
echo "charrnn-proxy: upstreams $(describe "$state")" >&2
nginx -c "$conf" &
nginx_pid=$!
trap 'kill -QUIT "$nginx_pid"; wait "$nginx_pid"; exit 0' QUIT
trap 'kill -TERM "$nginx_pid"; wait "$nginx_pid"; exit 0' TERM INT
probed=$state
while kill -0 "$nginx_pid" 2>/dev/null; do
    sleep "$interval" &
    wait $!
    previous=$probed
    probed=$(probe_all "$(candidates)")
    state=$(confirmed "$probed" "$previous")
    render "$(servers "$state")" "$rendered.new"
    if cmp -s "$rendered.new" "$rendered"; then
        continue
    fi
    cp "$rendered" "$rendered.old"
    mv "$rendered.new" "$rendered"
    if nginx -t -q -c "$conf" 2>/dev/null; then
        echo "charrnn-proxy: upstreams now $(describe "$state"); reloading nginx" >&2
        nginx -s reload -c "$conf" || echo "charrnn-proxy: nginx -s reload failed; nginx goes on as it was" >&2
    else
        echo "charrnn-proxy: the new upstream list fails nginx -t; keeping the old one" >&2
        mv "$rendered.old" "$rendered"
    fi
done
wait "$nginx_pid"
