#!/usr/bin/env bash
# Installs what the browser tests need: Debian's chromium, and playwright-core + axe-core from npm
# (into tests/browser/node_modules, from the committed package-lock.json). Skips what is present.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  echo "install-browser: installing Debian's chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
chromium --version

if [[ ! -d tests/browser/node_modules/playwright-core || ! -d tests/browser/node_modules/axe-core ]]; then
  echo "install-browser: installing playwright-core and axe-core (npm ci)"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
