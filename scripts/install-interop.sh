#!/usr/bin/env bash
# Installs the independent clients the interoperability tests use (the Java Avro library and the
# Java Kafka client, tests/interop/pom.xml) from Maven Central into a cache outside the clone.
# Prints the directory of jars on its last line. Idempotent; safe to run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/jars.sh

dest="${SECUREFORMS_CACHE:-$HOME/.cache/secureforms}/interop-jars"
copy_jars tests/interop/pom.xml "$dest" || { echo "install-interop: cannot install the Java clients" >&2; exit 1; }
echo "$dest"
