#!/usr/bin/env bash
# Builds secureforms in release mode, starts a fresh tansu broker on loopback, and runs
# `secureforms bench` against it. Extra arguments go to the bench (e.g. --records 20000 --json).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

scripts/install-broker.sh
cargo build --locked --release
work=$(mktemp -d)
trap '[[ -n "${BROKER_PID:-}" ]] && kill "$BROKER_PID" 2>/dev/null; rm -rf "$work"' EXIT
start_broker "$work/broker"
"$CARGO_TARGET_DIR/release/secureforms" bench --brokers "$BROKER" "$@"
