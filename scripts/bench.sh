#!/usr/bin/env bash
# Builds the pipeline benchmark (benches/pipeline.rs) in release mode, starts a fresh broker on
# loopback, and runs it against it: the same report on either broker.
#
# Usage: scripts/bench.sh [--broker kafka|tansu] [--broker-nice N] [bench args...]   (default: kafka,
# the production broker). Extra arguments go to the bench (e.g. --records 20000 --json).
# --broker-nice N runs the broker at nice N (the bench at 0), as if it had cores of its own (in
# production it has machines of its own): a diagnostic for what the co-located broker costs the
# latency phases, not the goal's setup (README, Performance).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

kind=kafka
if [[ "${1:-}" == "--broker" ]]; then
  kind=${2:?--broker needs kafka or tansu}
  shift 2
fi
case "$kind" in
  kafka) scripts/install-kafka.sh >/dev/null ;;
  tansu) scripts/install-broker.sh ;;
  *) echo "bench.sh: --broker takes kafka or tansu, not '$kind'" >&2; exit 2 ;;
esac
broker_nice=0
if [[ "${1:-}" == "--broker-nice" ]]; then
  broker_nice=${2:?--broker-nice needs a number of nice steps, e.g. 5}
  [[ "$broker_nice" =~ ^[0-9]+$ && "$broker_nice" -le 19 ]] \
    || { echo "bench.sh: --broker-nice takes 0 to 19, not '$broker_nice'" >&2; exit 2; }
  shift 2
fi
cargo bench --locked --bench pipeline --no-run
prune_build_cache release
work=$(mktemp -d)
trap 'stop_broker; rm -rf "$work"' EXIT
start_broker "$kind" "$work/broker"
if (( broker_nice > 0 )); then
  # Every thread the broker has now; threads it starts later inherit from them.
  for task in /proc/"$BROKER_PID"/task/*; do
    renice -n "$broker_nice" -p "${task##*/}" >/dev/null
  done
fi
echo "bench broker: $kind on $BROKER (nice $broker_nice)"
cargo bench --locked --bench pipeline -- --brokers "$BROKER" --broker-kind "$kind" --broker-pid "$BROKER_PID" "$@"
