# Shared by the scripts: the build cache and the broker helpers. Source it; do not run it.
#
# Brokers: `start_broker KIND DIR` starts tansu (the embedded default) or Apache Kafka (production)
# on free loopback ports with its data in DIR, waits until it answers a metadata request, and sets
# BROKER (host:port), BROKER_KIND, BROKER_PID, BROKER_LOG and BROKER_DATA (the files whose raw bytes
# the canary tests scan). `stop_broker` stops it cleanly (SIGTERM, then SIGKILL after 30 s).

# Build output lives outside the clone so fresh clones (CI) reuse it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/secureforms/target}"
# A fresh clone cannot reuse incremental state (its path is part of every unit's identity), so CI
# builds without it instead of leaving gigabytes of it behind on every run.
if [[ "${CI:-}" == "true" ]]; then
  export CARGO_INCREMENTAL=0
fi
CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
TANSU="$CARGO_HOME/bin/tansu"
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

free_port() {
  # free_port [AVOID...]: a loopback port nothing listens on, none of AVOID, taken below the kernel's
  # ephemeral range (as tests/common's free_port), so no outgoing connection takes it before the
  # broker binds it. A port from bind(0), released at once, can be handed out again.
  python3 - "$@" <<'PY'
import random, socket, sys
avoid = {int(p) for p in sys.argv[1:]}
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
for _ in range(1000):
    if low > 11000:
        port = random.randrange(10000, low)
    else:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
    if port in avoid:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    sys.exit(0)
sys.exit("free_port: no free loopback port found")
PY
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

# start_broker KIND DIR: KIND is tansu or kafka.
start_broker() {
  case "$1" in
    tansu) start_tansu "$2" ;;
    kafka) start_kafka "$2" ;;
    *) echo "start_broker: unknown broker kind '$1' (tansu or kafka)" >&2; return 2 ;;
  esac
}

# start_tansu DIR: tansu with sqlite storage in DIR.
start_tansu() {
  local dir=$1 port
  port=$(free_port)
  mkdir -p "$dir"
  # tansu resolves the sqlite path against its working directory.
  (cd "$dir" && RUST_LOG=warn exec "$TANSU" broker --storage-engine "sqlite://broker.db" \
    --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    >"$dir/broker.log" 2>&1) &
  BROKER_PID=$!
  BROKER="127.0.0.1:$port"
  BROKER_KIND=tansu
  BROKER_LOG="$dir/broker.log"
  BROKER_DATA="$dir"
  broker_ready 60
}

# start_kafka DIR: a single-node KRaft Apache Kafka (combined broker and controller) from the jars
# scripts/install-kafka.sh cached, with one-node settings and a small heap.
start_kafka() {
  local dir=$1 port cport jars
  jars=$("$SCRIPTS_DIR/install-kafka.sh") || return 1
  port=$(free_port)
  cport=$(free_port "$port")
  mkdir -p "$dir"
  write_kafka_config "$dir" "$port" "$cport"
  java -cp "$jars/*" -Dlog4j2.configurationFile="$dir/log4j2.properties" kafka.tools.StorageTool format \
    --standalone --cluster-id "$(java -cp "$jars/*" kafka.tools.StorageTool random-uuid 2>/dev/null)" \
    --config "$dir/server.properties" >"$dir/format.log" 2>&1 || {
    echo "start_kafka: formatting the storage failed:" >&2
    cat "$dir/format.log" >&2
    return 1
  }
  # exec: BROKER_PID is the JVM itself, so stop_broker's SIGTERM reaches Kafka's shutdown hook.
  (exec java -Xms256m -Xmx768m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$jars/*" \
    kafka.Kafka "$dir/server.properties" >"$dir/stdout.log" 2>&1) &
  BROKER_PID=$!
  BROKER="127.0.0.1:$port"
  BROKER_KIND=kafka
  BROKER_LOG="$dir/broker.log"
  BROKER_DATA="$dir/data"
  broker_ready 120
}

write_kafka_config() {
  local dir=$1 port=$2 cport=$3
  cat >"$dir/server.properties" <<PROPS
# Single-node KRaft Apache Kafka for tests and the bench: combined broker and controller, loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
PROPS
  cat "$SCRIPTS_DIR/../docker/kafka-one-node.properties" "$SCRIPTS_DIR/kafka/dev-broker.properties" >>"$dir/server.properties"
  cat >"$dir/log4j2.properties" <<PROPS
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $dir/broker.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = INFO
PROPS
}

# broker_ready SECONDS: waits until the broker answers a metadata request; on failure prints its log.
broker_ready() {
  if ! python3 "$SCRIPTS_DIR/broker-probe.py" "$BROKER" "$1"; then
    echo "the $BROKER_KIND broker did not come up; its log ($BROKER_LOG) ends:" >&2
    tail -n 50 "$BROKER_LOG" >&2 2>/dev/null || true
    [[ -f "${BROKER_LOG%/*}/stdout.log" ]] && tail -n 20 "${BROKER_LOG%/*}/stdout.log" >&2
    return 1
  fi
}

# stop_broker: SIGTERM (Kafka flushes and closes its logs), SIGKILL if still running after 30 s.
stop_broker() {
  [[ -n "${BROKER_PID:-}" ]] || return 0
  kill "$BROKER_PID" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$BROKER_PID" 2>/dev/null; do
    if ((SECONDS > deadline)); then
      echo "stop_broker: $BROKER_KIND did not stop within 30 s; killing it" >&2
      kill -9 "$BROKER_PID" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  wait "$BROKER_PID" 2>/dev/null || true
  BROKER_PID=
}

# prune_build_cache debug|release: removes this workspace's build output in that profile that the
# current tree does not use. Each fresh clone builds the workspace's own crates under new hashes
# (the clone's path is part of them), which would otherwise pile up in the shared cache: gigabytes
# per CI run. Asks cargo which artifacts the builds the scripts make use (up to date by now, so this
# only lists them) and keeps those; dependencies are never touched.
prune_build_cache() {
  local profile=$1
  local names=(secureforms pipeline)
  local f
  for f in tests/*.rs examples/*.rs; do
    [[ -e "$f" ]] && names+=("$(basename "$f" .rs)")
  done
  {
    if [[ "$profile" == release ]]; then
      cargo bench --locked --bench pipeline --no-run --message-format=json
    else
      cargo build --locked --all-targets --message-format=json
      cargo test --locked --no-run --message-format=json
      cargo clippy --locked --all-targets --message-format=json
    fi
  } 2>/dev/null | python3 "$SCRIPTS_DIR/prune-build-cache.py" "$CARGO_TARGET_DIR/$profile" "${names[@]}" \
    || echo "prune_build_cache: could not prune $CARGO_TARGET_DIR/$profile (the build itself is fine)" >&2
}
