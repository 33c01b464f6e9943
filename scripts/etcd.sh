#!/usr/bin/env bash
# A throwaway etcd for pulse's registry tests and the cluster example.
#
#   scripts/etcd.sh install   install Debian's etcd-server if `etcd` is missing
#   scripts/etcd.sh start     install if needed, start etcd on 127.0.0.1:$PULSE_ETCD_PORT
#                             (default 23790; peers on $PULSE_ETCD_PEER_PORT, default 23800),
#                             data in target/etcd-test, wait until it is healthy
#   scripts/etcd.sh stop      kill the etcd started by `start` (by its PID file)
#   scripts/etcd.sh status    say whether it runs and answers
#
# tests/etcd.rs does not need this: each test starts its own etcd on free ports
# when the `etcd` binary is installed. `start` serves the example and manual runs:
#   cargo run --example cluster -- --registry etcd://127.0.0.1:23790
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PORT="${PULSE_ETCD_PORT:-23790}"
PEER_PORT="${PULSE_ETCD_PEER_PORT:-23800}"
DIR="${PULSE_ETCD_DIR:-target/etcd-test}"
PID_FILE="$DIR/etcd.pid"
LOG_FILE="$DIR/etcd.log"

etcd_bin() {
    if command -v etcd >/dev/null 2>&1; then
        command -v etcd
    elif [ -x /usr/bin/etcd ]; then
        echo /usr/bin/etcd
    else
        return 1
    fi
}

install() {
    if etcd_bin >/dev/null; then
        echo "etcd: $(etcd_bin) is installed"
        return 0
    fi
    echo "etcd: not installed; installing Debian's etcd-server"
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq etcd-server >/dev/null
    # The Debian package starts a system-wide etcd on 2379; pulse's tests use
    # their own ports, so leave it alone rather than touch system services.
    etcd_bin >/dev/null || { echo "etcd: etcd-server installed but no etcd binary found" >&2; exit 1; }
    echo "etcd: installed $(etcd_bin)"
}

running_pid() {
    [ -f "$PID_FILE" ] || return 1
    local pid
    pid="$(cat "$PID_FILE")"
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

healthy() {
    # Plain bash: no curl needed.
    local reply
    reply="$( (exec 3<>"/dev/tcp/127.0.0.1/$PORT" &&
        printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 &&
        timeout 2 cat <&3) 2>/dev/null)" || return 1
    [[ "$reply" == *'"health":"true"'* ]]
}

start() {
    install
    if pid="$(running_pid)"; then
        echo "etcd: already running (pid $pid) on 127.0.0.1:$PORT"
        return 0
    fi
    mkdir -p "$DIR"
    local bin
    bin="$(etcd_bin)"
    # ETCD_UNSUPPORTED_ARCH lets the Debian build run on arm64 too.
    ETCD_UNSUPPORTED_ARCH="${ETCD_UNSUPPORTED_ARCH:-$(dpkg --print-architecture 2>/dev/null || echo amd64)}" \
        nohup "$bin" \
        --name pulse-test \
        --data-dir "$DIR/data" \
        --listen-client-urls "http://127.0.0.1:$PORT" \
        --advertise-client-urls "http://127.0.0.1:$PORT" \
        --listen-peer-urls "http://127.0.0.1:$PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
        --initial-cluster "pulse-test=http://127.0.0.1:$PEER_PORT" \
        >"$LOG_FILE" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
    for _ in $(seq 1 100); do
        if healthy; then
            echo "etcd: running (pid $(cat "$PID_FILE")) on 127.0.0.1:$PORT, data in $DIR"
            return 0
        fi
        if ! running_pid >/dev/null; then
            echo "etcd: exited during startup; last lines of $LOG_FILE:" >&2
            tail -n 20 "$LOG_FILE" >&2
            rm -f "$PID_FILE"
            exit 1
        fi
        sleep 0.1
    done
    echo "etcd: not healthy after 10 s; see $LOG_FILE" >&2
    exit 1
}

stop() {
    local pid
    if ! pid="$(running_pid)"; then
        echo "etcd: not running"
        rm -f "$PID_FILE"
        return 0
    fi
    kill "$pid"
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid"
    fi
    rm -f "$PID_FILE"
    echo "etcd: stopped (pid $pid)"
}

status() {
    if pid="$(running_pid)"; then
        if healthy; then
            echo "etcd: running (pid $pid) on 127.0.0.1:$PORT, healthy"
        else
            echo "etcd: running (pid $pid) on 127.0.0.1:$PORT, not answering"
            exit 1
        fi
    else
        echo "etcd: not running"
        exit 1
    fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 install|start|stop|status" >&2
        exit 2
        ;;
esac
