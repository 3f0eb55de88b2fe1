#!/usr/bin/env bash
# The whole flow on one machine with nothing else installed: installs the broker if missing, builds,
# runs `secureforms serve` on the embedded default, plays the chat bus, and prints what comes out.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

scripts/install-broker.sh
cargo build --locked
sf="$CARGO_TARGET_DIR/debug/secureforms"

data="secureforms-data/quickstart"
rm -rf "$data"
mkdir -p "$data"
# A throwaway master key for the demo. In production it comes from your secret store
# (SECUREFORMS_MASTER_KEY or master_key_file); `secureforms keys generate-master` makes one.
(umask 077 && "$sf" keys generate-master >"$data/master.key")
export SECUREFORMS_MASTER_KEY_FILE="$data/master.key"
# The chat platform signs agent tokens (HS256 here; JWKS in production). A throwaway demo secret.
jwt_secret=$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')
export SECUREFORMS_JWT_SECRET="$jwt_secret"
"$sf" serve --config config/demo.toml --data-dir "$data" >"$data/serve.log" 2>&1 &
# The visitor gateway listens on http://127.0.0.1:8080 (plain HTTP is allowed on loopback only).
serve_pid=$!
trap 'kill -TERM $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null' EXIT

deadline=$((SECONDS + 90))
until grep -q "service starting" "$data/serve.log"; do
  if ! kill -0 "$serve_pid" 2>/dev/null || ((SECONDS > deadline)); then
    echo "secureforms serve did not start; its log:" >&2
    cat "$data/serve.log" >&2
    exit 1
  fi
  sleep 0.2
done
echo "== secureforms serve is running on the embedded broker ($(cat "$data/broker.addr")), data in $data"

run() { echo "\$ secureforms $*"; "$sf" --data-dir "$data" --config config/demo.toml "$@"; }

echo
echo "== the chat bus sends forms"
run chatbus send-form --site acme --conversation conv-1 --agent agent-7 --template card-payment --form-id form-1
run chatbus send-form --site acme --conversation conv-2 --agent agent-8 --profile trainee --template card-payment --form-id form-2
run chatbus send-form --site weakco --conversation conv-3 --agent agent-9 --template card-payment --form-id form-3
run chatbus raw --key conv-4 --text 'this is not an Avro record'

echo
echo "== what the service answered on form-links (FormIssued carries the visitor link)"
run tail form-links --max 3 --idle-exit 30
echo
echo "== the bad record, kept with its reason on dead-letters"
run tail dead-letters --max 1 --idle-exit 30

echo
echo "== the visitor follows form-1's link: its page spends nothing (link previews are harmless)"
link=$("$sf" --data-dir "$data" tail form-links --max 3 --idle-exit 30 | python3 -c 'import json,sys
for l in sys.stdin:
    e=json.loads(l)
    if e.get("type")=="FormIssued" and e["event"]["form_id"]=="form-1": print(e["event"]["link"])')
echo "GET $link"
curl -sS "$link" | grep -o '<button[^>]*>[^<]*</button>'
echo "== the visitor clicks: the open key is spent, and the form carries a different, submit key"
page=$(curl -sS --data-urlencode "k=${link##*k=}" "${link%%\?*}/open")
echo "$page" | grep -o '<h1>[^<]*</h1>'
k=$(echo "$page" | python3 -c 'import re,sys; print(re.search(r"name=\"k\" value=\"([^\"]+)\"", sys.stdin.read()).group(1))')
echo
echo "== the visitor submits (answers are sealed before anything is written; the CVV stays in memory)"
curl -sS -o /dev/null -w "POST -> HTTP %{http_code}\n" --data-urlencode "k=$k" \
  --data-urlencode "pan=4111 1111 1111 1111" --data-urlencode "expiry=12/39" --data-urlencode "cvv=737" "${link%%\?*}"
echo
echo "== FormSubmitted on submissions: ciphertext only (answers base64), no CVV at all"
run tail submissions --max 2 --idle-exit 30 | grep FormSubmitted
echo
echo "== FormReady for the agent workspace: submission UUID and a one-time retrieve key"
ready=$(run tail agent-events --max 1 --idle-exit 30 | tee /dev/stderr | tail -n 1)
uuid=$(echo "$ready" | python3 -c 'import json,sys; print(json.load(sys.stdin)["event"]["submission_id"])')
rkey=$(echo "$ready" | python3 -c 'import json,sys; print(json.load(sys.stdin)["event"]["retrieve_key"])')

# An agent token as the chat platform would sign it (HS256 over the demo secret).
token() {
  JWT_SECRET="$jwt_secret" python3 - "$1" <<'PY'
import base64, hashlib, hmac, json, os, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": sys.argv[1], "site": "acme", "roles": ["agent"], "permissions": ["use_secure_form"],
                       "sid": "demo-session-" + sys.argv[1], "exp": int(time.time()) + 600}).encode())
sig = b64(hmac.new(os.environ["JWT_SECRET"].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")
PY
}
retrieve() {
  curl -sS -w ' <- HTTP %{http_code}\n' -X POST "http://127.0.0.1:8080/api/v1/submissions/$uuid/retrieve" \
    -H "Authorization: Bearer $(token "$1")" -H "Content-Type: application/json" -d "{\"key\":\"$rkey\"}"
}
# The demo masks the card number; the workspace gets it whole.
mask() { python3 -c 'import re,sys
for l in sys.stdin: print(re.sub(r"\b(\d{4})[ \d]{6,11}(\d{4})\b", lambda m: m.group(1)+" **** **** "+m.group(2), l), end="")'; }
echo
echo "== another agent of the same site tries the key: refused, only the agent who sent the form may see it"
retrieve agent-8
echo "== the agent who sent the form retrieves it with the key and their token (the PAN is masked here)"
retrieve agent-7 | mask
echo "== the same key again: refused, it was spent"
retrieve agent-7
echo
echo "== operations: readiness and a few metrics (the operations listener, 127.0.0.1:9464)"
curl -sS -w "  <- GET /readyz\n" http://127.0.0.1:9464/readyz
curl -sS http://127.0.0.1:9464/metrics | grep -E '^secureforms_(events_consumed_total\{handler="tokenizer"|dead_letters_total|otk_checks_total|ready )' || true
echo
echo "== operations: what a retention purge would remove as of 2099-12-31 (dry run), then a GDPR erasure"
echo "   (both run on an operations replica under $data/ops, beside the live node; log: $data/ops.log)"
run purge --as-of 2099-12-31 --dry-run 2>>"$data/ops.log"
run erase --site acme --conversation conv-1 2>>"$data/ops.log"
echo
echo "== operations: the compliance report (weakco fails the PCI policy gate, so this exits 1)"
run compliance 2>>"$data/ops.log" || true
echo
echo "== done; stopping the service (its log: $data/serve.log)"
