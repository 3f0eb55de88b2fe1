#!/usr/bin/env bash
# Installs the Kafka-protocol broker the tests and the embedded default use: tansu 0.6.0 from crates.io.
# Skips the build when a tansu 0.6.0 binary is already installed. Idempotent; safe to run in CI.
#
# Why these flags: tansu 0.6.0 needs --locked to build with Rust 1.95 (its newest dependencies need a
# newer rustc), and its default features carry no storage engine; libsql gives the sqlite:// engine.
set -euo pipefail

TANSU_VERSION="0.6.0"
CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
bin="$CARGO_HOME/bin/tansu"

if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  echo "install-broker: tansu $TANSU_VERSION already installed at $bin"
  exit 0
fi

echo "install-broker: building tansu $TANSU_VERSION from crates.io (about 20 minutes on 2 cores, once)"
cargo install tansu --locked --version "$TANSU_VERSION" \
  --no-default-features --features libsql,dynostore
"$bin" --version
