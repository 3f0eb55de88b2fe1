#!/usr/bin/env bash
# Runs every test against a real Kafka-protocol broker process. Installs what is missing first
# (the broker); builds once, then tests. Usage: scripts/test.sh [cargo test args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

scripts/install-broker.sh
scripts/install-browser.sh

work=$(mktemp -d)
cleanup() {
  [[ -n "${BROKER_PID:-}" ]] && kill "$BROKER_PID" 2>/dev/null && wait "$BROKER_PID" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

start_broker "$work/broker"
export SF_TEST_BROKERS="$BROKER" SF_TEST_BROKER_DIR="$work/broker"
echo "test broker: tansu on $BROKER"

cargo build --locked --all-targets
set +e
cargo test --locked --no-fail-fast "$@" 2>&1 | tee "$work/test.log"
status=${PIPESTATUS[0]}
set -e

# One summary line for the whole run.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "\nsummary: %d passed, %d failed, %d skipped\n", p, f, i }' "$work/test.log"
exit "$status"
