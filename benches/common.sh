# Shared by benches/load.sh and benches/instructions.sh (sourced, not run): the release
# builds, a scratch directory cleaned up on exit, free ports, the upstream's FHIR
# resources, nginx configurations and a bench JWT.

# BIN: the gateway; FLOOR_BIN: benches/hyper_floor.rs; MINT_BIN: benches/mint_tokens.rs.
build_binaries() {
  cargo build --release --quiet
  BIN=target/release/smartgate
  FLOOR_BIN=$(bench_binary hyper_floor)
  MINT_BIN=$(bench_binary mint_tokens)
}

# The executable of bench target $1 (built in release mode).
bench_binary() {
  cargo build --release --quiet --bench "$1" --message-format=json \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1"
}

# The end of every bench configuration: like nginx here (access_log off), no audit line
# per request; warnings only; no file watching.
quiet_tail() { printf '[audit]\nsink = "off"\n[log]\nlevel = "warn"\n[reload]\nwatch = false\n'; }

# WORK: a scratch directory; every PID added to PIDS is killed on exit.
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A FHIR Patient and an Observation of that patient, as a small static upstream would
# return them. The Observation is read with a patient/ token: a compartment-verified read.
PATIENT='{"resourceType":"Patient","id":"example","meta":{"versionId":"1","lastUpdated":"2024-01-01T00:00:00Z"},"active":true,"name":[{"use":"official","family":"Chalmers","given":["Peter","James"]}],"gender":"male","birthDate":"1974-12-25"}'
OBS='{"resourceType":"Observation","id":"obs-1","meta":{"versionId":"1","lastUpdated":"2024-01-01T00:00:00Z"},"status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}]}],"code":{"coding":[{"system":"http://loinc.org","code":"2339-0","display":"Glucose"}]},"subject":{"reference":"Patient/example"},"effectiveDateTime":"2024-01-01T08:00:00Z","valueQuantity":{"value":95,"unit":"mg/dL","system":"http://unitsofmeasure.org","code":"mg/dL"}}'

# Writes $WORK/$1/nginx.conf: main-context directives $2, server blocks on stdin.
nginx_conf() {
  mkdir -p "$WORK/$1"
  { cat <<NGINX
$2
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/$1/body;
  proxy_temp_path $WORK/$1/proxy;
  fastcgi_temp_path $WORK/$1/fcgi;
  uwsgi_temp_path $WORK/$1/uwsgi;
  scgi_temp_path $WORK/$1/scgi;
  keepalive_requests 1000000;
NGINX
    cat
    echo "}"
  } >"$WORK/$1/nginx.conf"
}

# The baseline proxy's server blocks: nginx proxy_pass with upstream keepalive from port
# $2 to the upstream on port $1. Under /r4/ the plain baseline (X-Forwarded-For and
# X-Forwarded-Proto only); under /same/ nginx does the header work smartgate does on
# every request: X-Forwarded-Host and Forwarded as well, a request id sent upstream and
# returned, the client's Authorization and Accept-Encoding not passed on.
proxy_server() {
  cat <<NGINX
  upstream fhir { server 127.0.0.1:$1; keepalive 128; }
  server {
    listen 127.0.0.1:$2;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host \$proxy_host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto \$scheme;
    location /r4/ {
      proxy_pass http://fhir/fhir/;
    }
    location /same/ {
      proxy_pass http://fhir/fhir/;
      proxy_set_header Connection "";
      proxy_set_header Host \$proxy_host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_set_header Forwarded "for=\$remote_addr;proto=\$scheme;host=\$host";
      proxy_set_header X-Request-Id \$request_id;
      proxy_set_header Authorization "";
      proxy_set_header Accept-Encoding "";
      add_header X-Request-Id \$request_id always;
    }
  }
NGINX
}

b64url() { python3 -c 'import base64,sys; print(base64.urlsafe_b64encode(sys.stdin.buffer.read()).rstrip(b"=").decode())'; }

# An RS256 key (MODULUS: its JWKS "n") and two hour-long access tokens from
# https://issuer.bench with audience $1: TOKEN, patient/*.rs for patient "example" (its
# reads are checked against the compartment, answer included), and USER_TOKEN,
# user/*.rs for a practitioner (a decision from the scopes alone, the answer passed on).
bench_token() {
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/jwt.pem" 2>/dev/null
  MODULUS=$(openssl rsa -in "$WORK/jwt.pem" -noout -modulus | cut -d= -f2 | python3 -c 'import sys; sys.stdout.buffer.write(bytes.fromhex(sys.stdin.read().strip()))' | b64url)
  local now
  now=$(date +%s)
  TOKEN=$(sign_bench_token "$(printf '{"iss":"https://issuer.bench","aud":"%s","sub":"bench","client_id":"bench","scope":"launch/patient patient/*.rs","patient":"example","iat":%s,"exp":%s}' "$1" "$now" "$((now + 3600))")")
  USER_TOKEN=$(sign_bench_token "$(printf '{"iss":"https://issuer.bench","aud":"%s","sub":"bench","client_id":"bench","scope":"openid fhirUser user/*.rs","fhirUser":"Practitioner/bench","iat":%s,"exp":%s}' "$1" "$now" "$((now + 3600))")")
}

# The compact JWS of claims $1, signed RS256 with $WORK/jwt.pem.
sign_bench_token() {
  local header payload signature
  header=$(printf '{"alg":"RS256","kid":"bench","typ":"at+jwt"}' | b64url)
  payload=$(printf '%s' "$1" | b64url)
  signature=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -sign "$WORK/jwt.pem" | b64url)
  echo "$header.$payload.$signature"
}
