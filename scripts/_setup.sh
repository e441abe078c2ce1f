# Sourced by scripts/test and scripts/demo: a virtual environment with taskthrottle[dev].
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Install once, and again only when pyproject.toml (the dependencies, the entry points) or
# the environment's Python changed: the stamp holds a hash of both. The install is editable,
# so changes to the code need none.
STAMP=.venv/taskthrottle-installed
wanted=$( (cat pyproject.toml; .venv/bin/python -VV) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$wanted" ]; then
    echo "installing taskthrottle[dev] into .venv" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    echo "$wanted" >"$STAMP"
fi

redis_answers() {  # redis_answers HOST PORT
    .venv/bin/python - "$1" "$2" <<'PY'
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as s:
        s.sendall(b"PING\r\n")
        sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
}

# Use the Redis on 127.0.0.1:6379 when one answers; otherwise start one on a free loopback
# port (installing Debian's redis-server when missing) and stop it when the script exits.
ensure_redis() {
    # The fault suite starts redis-servers of its own, whatever answers on 6379.
    if ! command -v redis-server >/dev/null; then
        echo "no redis-server: installing Debian's redis-server" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    fi
    if [ -n "${TASKTHROTTLE_REDIS_URL:-}" ]; then
        return
    fi
    if redis_answers 127.0.0.1 6379; then
        export TASKTHROTTLE_REDIS_URL=redis://127.0.0.1:6379/9
        return
    fi
    local port
    port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    REDIS_DIR=$(mktemp -d)
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$REDIS_DIR" \
        --logfile "$REDIS_DIR/redis.log" --daemonize no &
    REDIS_PID=$!
    trap 'kill "$REDIS_PID" 2>/dev/null; wait "$REDIS_PID" 2>/dev/null; rm -rf "$REDIS_DIR"' EXIT
    for _ in $(seq 100); do
        redis_answers 127.0.0.1 "$port" && break
        sleep 0.1
    done
    redis_answers 127.0.0.1 "$port" || { echo "redis-server did not start" >&2; exit 1; }
    echo "started redis-server on 127.0.0.1:$port (pid $REDIS_PID)" >&2
    export TASKTHROTTLE_REDIS_URL=redis://127.0.0.1:$port/9
}
