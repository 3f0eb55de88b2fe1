#!/usr/bin/env bash
# Runs every test against real Kafka-protocol broker processes: Apache Kafka 4.x (production) and
# tansu 0.6.0 (the embedded default). Installs what is missing first; builds once, then tests.
#
# Usage: scripts/test.sh [--broker kafka|tansu|both] [cargo test args...]
#   both (default): the whole suite on Apache Kafka, then the integration tests again on tansu
#   (unit tests need no broker and run once). Fails if any run fails; prints one summary per broker
#   and a closing line for the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

which=both
if [[ "${1:-}" == "--broker" ]]; then
  which=${2:?--broker needs kafka, tansu or both}
  shift 2
fi
case "$which" in
  kafka) kinds=(kafka) ;;
  tansu) kinds=(tansu) ;;
  both) kinds=(kafka tansu) ;;
  *) echo "test.sh: --broker takes kafka, tansu or both, not '$which'" >&2; exit 2 ;;
esac

for k in "${kinds[@]}"; do
  case "$k" in
    kafka) scripts/install-kafka.sh >/dev/null ;;
    tansu) scripts/install-broker.sh ;;
  esac
done
scripts/install-browser.sh
scripts/install-schemathesis.sh >/dev/null

work=$(mktemp -d)
cleanup() {
  stop_broker
  rm -rf "$work"
}
trap cleanup EXIT

echo "checking format and lints"
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --quiet
cargo build --locked --all-targets
cargo test --locked --no-run --quiet
prune_build_cache debug

status=0
summaries=()
first=1
for kind in "${kinds[@]}"; do
  start_broker "$kind" "$work/$kind"
  export SF_TEST_BROKERS="$BROKER" SF_TEST_BROKER_KIND="$kind" SF_TEST_BROKER_DIR="$BROKER_DATA"
  echo
  echo "=== tests on $kind ($BROKER) ==="
  args=()
  # Unit tests need no broker: the first run takes them, later runs only the integration tests.
  ((first)) || args=(--test '*')
  set +e
  cargo test --locked --no-fail-fast "${args[@]}" "$@" 2>&1 | tee "$work/test-$kind.log"
  run_status=${PIPESTATUS[0]}
  set -e
  if ((run_status != 0)); then
    status=$run_status
    echo "--- tests failed on $kind; the broker's log ($BROKER_LOG) ends:"
    tail -n 40 "$BROKER_LOG" 2>/dev/null || true
  fi
  summaries+=("$(awk -v k="$kind" '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%s: %d passed, %d failed, %d skipped", k, p, f, i }' "$work/test-$kind.log")")
  stop_broker
  first=0
done

echo
printf '%s\n' "${summaries[@]}"
# One closing line for the whole run.
cat "$work"/test-*.log | awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, i }'
exit "$status"
