#!/bin/sh
# Render nginx.conf.tmpl (the same template the development helper renders)
# for a container: compose.yaml and the Kubernetes nginx Deployment run it at
# start from the nginx image's /docker-entrypoint.d/.
#
# Environment (defaults in brackets):
#   NGINX_TEMPLATE  the template [/etc/nginx/chat/nginx.conf.tmpl]
#   NGINX_VAR       writable directory for temp files, pid and config [/tmp/nginx-chat]
#   NGINX_CONF      where the config is written [$NGINX_VAR/nginx.conf]
#   PUBLIC_PORT     the port Nginx listens on [8080]
#   NGINX_LISTEN_ALL  true: listen on every interface, not only loopback [true]
#   NGINX_LOG_FILES   empty: logs go to the container's stdout/stderr [empty]
#   NGINX_AUTH_RATE, NGINX_AUTH_BURST  per-address limit of signup/login/refresh [20r/s, 40]
#   WWW_ROOT, DOCS_ROOT  the test page and the API reference [/srv/chat/www, /srv/chat/docs]
#   MIME_TYPES      [/etc/nginx/mime.types]
#   UPSTREAM_<NAME> servers of each upstream the template proxies to, comma or
#                   space separated host:port [profile:8101, group:8102,
#                   persistence:8103, gateway:8111]. A name resolving to several
#                   addresses (compose replicas, a headless Service) gives one
#                   server per address, resolved when Nginx starts.
set -eu

TEMPLATE="${NGINX_TEMPLATE:-/etc/nginx/chat/nginx.conf.tmpl}"
NGINX_VAR="${NGINX_VAR:-/tmp/nginx-chat}"
OUT="${NGINX_CONF:-$NGINX_VAR/nginx.conf}"
export NGINX_VAR
export PUBLIC_PORT="${PUBLIC_PORT:-8080}"
export WWW_ROOT="${WWW_ROOT:-/srv/chat/www}"
export DOCS_ROOT="${DOCS_ROOT:-/srv/chat/docs}"
export MIME_TYPES="${MIME_TYPES:-/etc/nginx/mime.types}"
export PID_FILE="${PID_FILE:-$NGINX_VAR/nginx.pid}"
export AUTH_RATE="${NGINX_AUTH_RATE:-20r/s}"
export AUTH_BURST="${NGINX_AUTH_BURST:-40}"
# The image runs nginx as its own unprivileged user: no user directive.
export USER_DIRECTIVE="${NGINX_USER_DIRECTIVE:-}"

default_servers() {
    case "$1" in
        profile) echo "profile:8101" ;;
        group) echo "group:8102" ;;
        persistence) echo "persistence:8103" ;;
        gateway) echo "gateway:8111" ;;
        *) echo "" ;;
    esac
}

# One upstream block per name the template proxies to (proxy_pass http://NAME).
UPSTREAMS=""
for name in $(sed -n 's|.*proxy_pass http://\([A-Za-z0-9_]*\)[;/].*|\1|p' "$TEMPLATE" | sort -u); do
    var="UPSTREAM_$(echo "$name" | tr 'a-z' 'A-Z')"
    eval "servers=\${$var:-}"
    [ -n "$servers" ] || servers="$(default_servers "$name")"
    if [ -z "$servers" ]; then
        echo "render.sh: set $var (host:port list) for upstream $name" >&2
        exit 1
    fi
    block="    upstream $name {
        least_conn;"
    for server in $(echo "$servers" | tr ',' ' '); do
        block="$block
        server $server max_fails=0;"
    done
    # keepalive_timeout below gunicorn's 2 s keepalive: Nginx drops an idle connection
    # first, so no request is sent on one the service is closing (a lost POST).
    UPSTREAMS="$UPSTREAMS$block
        keepalive 32;
        keepalive_timeout 1s;
    }
"
done
export UPSTREAMS

mkdir -p "$NGINX_VAR/tmp" "$NGINX_VAR/log" "$(dirname "$OUT")"
if [ -z "${NGINX_LOG_FILES:-}" ]; then
    # Container logs: the access log (already without query strings) to stdout.
    ln -sf /dev/stdout "$NGINX_VAR/log/access.log"
    ln -sf /dev/stderr "$NGINX_VAR/log/error.log"
fi

# Replace every {{NAME}} with $NAME (comment lines are kept as they are); a
# placeholder without a value is an error.
awk '
/^[ \t]*#/ { print; next }
{
    line = $0
    out = ""
    while (match(line, /\{\{[A-Z_]+\}\}/)) {
        key = substr(line, RSTART + 2, RLENGTH - 4)
        if (!(key in ENVIRON)) {
            print "render.sh: no value for {{" key "}}" > "/dev/stderr"
            exit 1
        }
        out = out substr(line, 1, RSTART - 1) ENVIRON[key]
        line = substr(line, RSTART + RLENGTH)
    }
    print out line
}' "$TEMPLATE" > "$OUT.tmp"

if [ "${NGINX_LISTEN_ALL:-true}" = "true" ]; then
    # The template listens on loopback (development); a container listens on every interface.
    sed 's/listen 127\.0\.0\.1:/listen /' "$OUT.tmp" > "$OUT"
    rm -f "$OUT.tmp"
else
    mv "$OUT.tmp" "$OUT"
fi
echo "render.sh: wrote $OUT"
