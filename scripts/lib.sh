# Shared by the scripts: the build cache and the broker helpers. Source it; do not run it.

# Build output lives outside the clone so fresh clones (CI) reuse it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/secureforms/target}"
CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
TANSU="$CARGO_HOME/bin/tansu"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_for_port PORT SECONDS: polls until something listens, fails after the deadline.
wait_for_port() {
  local port=$1 deadline=$((SECONDS + $2))
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    if ((SECONDS > deadline)); then
      echo "nothing listens on 127.0.0.1:$port after $2 s" >&2
      return 1
    fi
    sleep 0.1
  done
}

# start_broker DIR: starts tansu with sqlite storage in DIR on a free port; sets BROKER and BROKER_PID.
start_broker() {
  local dir=$1 port
  port=$(free_port)
  mkdir -p "$dir"
  # tansu resolves the sqlite path against its working directory.
  (cd "$dir" && RUST_LOG=warn exec "$TANSU" broker --storage-engine "sqlite://broker.db" \
    --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    >"$dir/broker.log" 2>&1) &
  BROKER_PID=$!
  BROKER="127.0.0.1:$port"
  wait_for_port "$port" 60
}
