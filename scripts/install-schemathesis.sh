#!/usr/bin/env bash
# Installs schemathesis (the OpenAPI fuzzer the API contract test runs) from PyPI into a virtualenv
# outside the clone, at the versions pinned in tests/schemathesis/requirements.txt. Prints the
# schemathesis executable on its last line. Skipped when that exact set is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

reqs=tests/schemathesis/requirements.txt
tag=$(sha256sum "$reqs" | cut -c1-12)
venv="${SECUREFORMS_CACHE:-$HOME/.cache/secureforms}/schemathesis-$tag"
bin="$venv/bin/schemathesis"
# The stamp is written last: a half-finished install is redone, never used.
if [[ -f "$venv/.complete" ]] && "$bin" --version >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi
command -v python3 >/dev/null || { echo "install-schemathesis: python3 (3.9 or newer) is needed" >&2; exit 1; }
rm -rf "$venv"
python3 -m venv "$venv" || {
  echo "install-schemathesis: python3 -m venv failed; install the venv module (Debian: python3-venv)" >&2
  exit 1
}
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$reqs" >&2 || {
  echo "install-schemathesis: pip could not install $reqs from PyPI (is https://pypi.org reachable?)" >&2
  exit 1
}
touch "$venv/.complete"
echo "$bin"
