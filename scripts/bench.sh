#!/usr/bin/env bash
# Builds the pipeline benchmark (benches/pipeline.rs) in release mode, starts a fresh broker on
# loopback, and runs it against it: the same report on either broker.
#
# Usage: scripts/bench.sh [--broker kafka|tansu] [bench args...]   (default: kafka, the production
# broker). Extra arguments go to the bench (e.g. --records 20000 --json).
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
cargo bench --locked --bench pipeline --no-run
prune_build_cache release
work=$(mktemp -d)
trap 'stop_broker; rm -rf "$work"' EXIT
start_broker "$kind" "$work/broker"
echo "bench broker: $kind on $BROKER"
cargo bench --locked --bench pipeline -- --brokers "$BROKER" --broker-kind "$kind" --broker-pid "$BROKER_PID" "$@"
