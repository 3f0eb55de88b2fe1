#!/usr/bin/env bash
# Installs Apache Kafka (the production broker) for the tests, the bench and `embedded_broker =
# "kafka"`, from Maven Central: `mvn dependency:copy-dependencies` over scripts/kafka/pom.xml copies
# kafka_2.13 and everything it needs, plus the log4j2 binding, into a cache outside the clone
# (~/.cache/secureforms/kafka-<version>). Skipped when that cache is complete. Prints the directory
# of jars on its last line. Idempotent; safe to run in CI.
#
# Why Maven Central: the Apache download site and Docker images are out of reach here; the broker's
# jars are on Maven Central like any library (ADR 13).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/jars.sh

pom=scripts/kafka/pom.xml
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")
dest="${SECUREFORMS_CACHE:-$HOME/.cache/secureforms}/kafka-$version"
copy_jars "$pom" "$dest" || { echo "install-kafka: cannot install Apache Kafka $version" >&2; exit 1; }
if [[ ! -f "$dest/kafka_2.13-$version.jar" ]]; then
  echo "install-kafka: kafka_2.13-$version.jar missing in $dest; remove the directory and run again" >&2
  exit 1
fi
echo "$dest"
