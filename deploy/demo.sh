#!/usr/bin/env bash
# A local demo in one command: a real FHIR engine (tests/e2e/fhir-server.mjs, npm
# @medplum/fhir-router, seeded with patients p1 and p2), smartgate in front of it with its
# embedded SMART Backend Services authorization server and one registered client, and the
# commands to get a token and read through the gateway. Ctrl-C stops everything.
#
#   ./deploy/demo.sh
#
# Needs Node.js 20+, npm and a Rust toolchain. Ports: GATEWAY_PORT (8080), ADMIN_PORT (9090),
# FHIR_PORT (8081), IDP_PORT (8082: the sign-in provider, npm oidc-provider), APP_PORT (8083:
# a patient app built on SMART's fhirclient). SMARTGATE_BIN uses an existing binary.
# DEMO_SELFTEST=1 runs the printed commands itself, checks their answers and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

GATEWAY_PORT=${GATEWAY_PORT:-8080}
ADMIN_PORT=${ADMIN_PORT:-9090}
FHIR_PORT=${FHIR_PORT:-8081}
IDP_PORT=${IDP_PORT:-8082}
APP_PORT=${APP_PORT:-8083}
BASE="http://127.0.0.1:$GATEWAY_PORT/r4"

for tool in node npm curl; do
  command -v "$tool" >/dev/null || { echo "demo: needs $tool" >&2; exit 2; }
done
if [ -z "${SMARTGATE_BIN:-}" ]; then
  echo "demo: building smartgate (release; the first build takes a few minutes)…" >&2
  cargo build --release --quiet --bin smartgate
  SMARTGATE_BIN=$ROOT/target/release/smartgate
fi
if [ ! -f tests/e2e/node_modules/.package-lock.json ]; then
  echo "demo: installing the FHIR engine (npm ci)…" >&2
  (cd tests/e2e && npm ci --no-audit --no-fund --silent)
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The FHIR engine.
(cd tests/e2e && PORT=$FHIR_PORT exec node fhir-server.mjs) >"$WORK/fhir.log" 2>&1 &
PIDS+=($!)

# The sign-in provider for the patient app (npm oidc-provider: any password).
IDP_SECRET=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
(cd tests/e2e && PORT=$IDP_PORT GATEWAY_CALLBACK="$BASE/auth/callback" GATEWAY_SECRET="$IDP_SECRET" \
  exec node login-provider.mjs) >"$WORK/idp.log" 2>&1 &
PIDS+=($!)
# The patient app, served for a browser.
(cd tests/e2e && GATEWAY="$BASE" CLIENT_ID=demo-app APP_PORT=$APP_PORT OTHER_PATIENT=p2 \
  exec node fhirclient-app.mjs) >"$WORK/app.log" 2>&1 &
PIDS+=($!)

# Keys: the gateway's signing key, and the demo client's key pair.
"$SMARTGATE_BIN" keygen --alg ES384 --out "$WORK/gateway.pem" >/dev/null 2>&1
"$SMARTGATE_BIN" keygen --alg ES384 --out "$WORK/client.pem" 2>/dev/null >"$WORK/client-jwks.json"
CLIENT_JWKS=$(tr -d '\n ' <"$WORK/client-jwks.json")

cat >"$WORK/smartgate.toml" <<TOML
[server]
listen = "127.0.0.1:$GATEWAY_PORT"
public_base_url = "$BASE"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[upstream]
url = "http://127.0.0.1:$FHIR_PORT/fhir"

[auth]
mode = "embedded"

[log]
level = "info"

[audit]
sink = "file"
path = "$WORK/audit.jsonl"

[authorization_server]
enabled = true
signing_key = "$WORK/gateway.pem"

[[authorization_server.clients]]
client_id = "demo-client"
jwks = '$CLIENT_JWKS'
scope = "system/Patient.rs system/Observation.rs"

[authorization_server.login]
issuer = "http://127.0.0.1:$IDP_PORT"
client_id = "smartgate"
client_secret = "$IDP_SECRET"
scopes = ["openid", "fhirUser"]

[[authorization_server.clients]]
client_id = "demo-app"
public = true
redirect_uris = ["http://127.0.0.1:$APP_PORT/callback.html", "http://127.0.0.1:$((APP_PORT + 1))/callback.html"]
scope = "launch/patient openid fhirUser patient/*.rs"
TOML

"$SMARTGATE_BIN" serve --config "$WORK/smartgate.toml" 2>"$WORK/smartgate.log" &
PIDS+=($!)

for _ in $(seq 150); do
  if curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN_PORT/readyz" 2>/dev/null \
    && curl -fsS -o /dev/null "http://127.0.0.1:$FHIR_PORT/fhir/metadata" 2>/dev/null \
    && curl -fsS -o /dev/null "http://127.0.0.1:$IDP_PORT/.well-known/openid-configuration" 2>/dev/null \
    && curl -fsS -o /dev/null "http://127.0.0.1:$APP_PORT/launch.html" 2>/dev/null; then
    READY=1
    break
  fi
  sleep 0.2
done
if [ -z "${READY:-}" ]; then
  echo "demo: did not start" >&2
  tail -n 20 "$WORK/fhir.log" "$WORK/smartgate.log" "$WORK/idp.log" "$WORK/app.log" >&2
  exit 1
fi

ASSERT="$SMARTGATE_BIN client-assertion --key $WORK/client.pem --client-id demo-client --aud $BASE/auth/token"
GET_TOKEN="curl -s $BASE/auth/token -d grant_type=client_credentials -d scope=system/Observation.rs \\
  -d client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer \\
  -d client_assertion=\$($ASSERT)"

cat <<EOF

smartgate demo is running
  FHIR engine (two patients, p1 and p2)  http://127.0.0.1:$FHIR_PORT/fhir
  smartgate (FHIR base)                  $BASE
  discovery                              $BASE/.well-known/smart-configuration
  metrics                                http://127.0.0.1:$ADMIN_PORT/metrics
  audit trail (who read what)            tail -f $WORK/audit.jsonl

Get a Backend Services token (a fresh signed client assertion each time):

  TOKEN=\$($GET_TOKEN \\
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

Read through the gateway:

  curl -s -H "Authorization: Bearer \$TOKEN" '$BASE/Observation?_count=3'

A refusal (the token has no scope for Condition): 403 insufficient_scope

  curl -s -i -H "Authorization: Bearer \$TOKEN" '$BASE/Condition'

A patient app (SMART App Launch, built on SMART's own fhirclient): open

  http://127.0.0.1:$APP_PORT/launch.html

sign in as p1 (any password), allow, and the app shows patient p1's record, and the
refusal of p2's.

Ctrl-C stops everything.
EOF

if [ -n "${DEMO_SELFTEST:-}" ]; then
  TOKEN=$(eval "$GET_TOKEN" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  read_status=$(curl -s -o "$WORK/read.json" -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$BASE/Observation?_count=3")
  deny_status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$BASE/Condition")
  entries=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1])).get("entry", [])))' "$WORK/read.json")
  echo "selftest: read $read_status ($entries entries), refusal $deny_status"
  [ "$read_status" = 200 ] && [ "$entries" = 3 ] && [ "$deny_status" = 403 ] || exit 1
  # The patient app, in a headless browser where one is installed.
  if command -v chromium >/dev/null; then
    app=$(cd tests/e2e && GATEWAY="$BASE" CLIENT_ID=demo-app APP_PORT=$((APP_PORT + 1)) LOGIN=p1 \
      OTHER_PATIENT=p2 CHROMIUM="$(command -v chromium)" node fhirclient-app.mjs 2>/dev/null | tail -1)
    echo "selftest: patient app $app"
    [ "$app" = '{"patient":"p1","own":"Patient/p1","other":403}' ] || exit 1
  fi
  exit 0
fi
wait
