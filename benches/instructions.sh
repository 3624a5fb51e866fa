#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's callgrind: a figure
# that does not move with the load of a shared machine, so a change of a few percent in
# the proxy's own work shows up where wall-clock runs (benches/load.sh) only see noise.
# Kernel time (the TCP stack, system calls) is not counted; load.sh measures the whole.
#
#   benches/instructions.sh                # every target
#   TARGETS="nginx smartgate" benches/instructions.sh
#   KEEP_CALLGRIND=/tmp/cg TARGETS=jwt benches/instructions.sh   # keep the profiles
#
# Each target runs twice under callgrind, serving N1 and then N2 requests from 4
# keep-alive connections; (instructions(N2) - instructions(N1)) / (N2 - N1) is the cost
# of one request with start-up and shutdown taken out. Targets:
#   nginx      nginx proxy_pass with upstream keepalive (one worker, no master)
#   floor      benches/hyper_floor.rs with hyper-util's pooled client
#   floor_conn benches/hyper_floor.rs with hyper connection-level senders
#   smartgate  smartgate pass-through (auth.mode = "none")
#   jwt        smartgate with a JWT (RS256, cached after first use) and a SMART decision
#   verified   smartgate, a patient/ token reading an Observation checked against the compartment
#
# Needs valgrind, nginx and python3 (Debian: apt-get install -y valgrind nginx).
set -euo pipefail
cd "$(dirname "$0")/.."

N1=${N1:-400}
N2=${N2:-2400}
for tool in valgrind nginx python3 openssl; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install -y valgrind nginx)" >&2; exit 2; }
done
cargo build --release --quiet
BIN=target/release/smartgate
FLOOR_BIN=$(cargo build --release --quiet --bench hyper_floor --message-format=json \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "hyper_floor" and m.get("executable"):
        print(m["executable"])')

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); PORT=$(free_port); ADMIN=$(free_port)

PATIENT='{"resourceType":"Patient","id":"example","meta":{"versionId":"1","lastUpdated":"2024-01-01T00:00:00Z"},"active":true,"name":[{"use":"official","family":"Chalmers","given":["Peter","James"]}],"gender":"male","birthDate":"1974-12-25"}'
OBS='{"resourceType":"Observation","id":"obs-1","meta":{"versionId":"1","lastUpdated":"2024-01-01T00:00:00Z"},"status":"final","code":{"coding":[{"system":"http://loinc.org","code":"2339-0"}]},"subject":{"reference":"Patient/example"},"valueQuantity":{"value":95,"unit":"mg/dL"}}'

# nginx configuration $1 (directory) with server blocks on stdin; worker settings in $2.
nginx_conf() {
  mkdir -p "$WORK/$1"
  { cat <<NGINX
$2
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections 1024; }
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

# The upstream: a plain nginx, not measured.
nginx_conf upstream "worker_processes 1;" <<NGINX
  server {
    listen 127.0.0.1:$UP;
    location /fhir/ { default_type application/fhir+json; return 200 '$PATIENT'; }
    location /fhir/Observation/ { default_type application/fhir+json; return 200 '$OBS'; }
  }
NGINX
nginx -c "$WORK/upstream/nginx.conf" -p "$WORK/upstream" -g 'daemon off;' &
PIDS+=($!)

# The measured nginx: one process, so callgrind sees all of its work.
nginx_conf proxy "worker_processes 1; master_process off; daemon off;" <<NGINX
  upstream fhir { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$PORT;
    location /r4/ {
      proxy_pass http://fhir/fhir/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$proxy_host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }
NGINX

gateway_conf() { # $1 = [auth] section
  cat <<TOML
[server]
listen = "127.0.0.1:$PORT"
public_base_url = "http://127.0.0.1:$PORT/r4"
[admin]
listen = "127.0.0.1:$ADMIN"
[upstream]
url = "http://127.0.0.1:$UP/fhir"
[log]
level = "warn"
[reload]
watch = false
$1
TOML
}
gateway_conf $'[auth]\nmode = "none"' >"$WORK/none.toml"

# A JWT for the jwt and verified targets: RS256, JWKS inline.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/jwt.pem" 2>/dev/null
b64url() { python3 -c 'import base64,sys; print(base64.urlsafe_b64encode(sys.stdin.buffer.read()).rstrip(b"=").decode())'; }
MODULUS=$(openssl rsa -in "$WORK/jwt.pem" -noout -modulus | cut -d= -f2 | python3 -c 'import sys; sys.stdout.buffer.write(bytes.fromhex(sys.stdin.read().strip()))' | b64url)
NOW=$(date +%s)
HEADER=$(printf '{"alg":"RS256","kid":"bench","typ":"at+jwt"}' | b64url)
PAYLOAD=$(printf '{"iss":"https://issuer.bench","aud":"http://127.0.0.1:%s/r4","sub":"bench","client_id":"bench","scope":"launch/patient patient/*.rs","patient":"example","iat":%s,"exp":%s}' "$PORT" "$NOW" "$((NOW + 3600))" | b64url)
SIGNATURE=$(printf '%s.%s' "$HEADER" "$PAYLOAD" | openssl dgst -sha256 -sign "$WORK/jwt.pem" | b64url)
TOKEN="$HEADER.$PAYLOAD.$SIGNATURE"
gateway_conf "[auth]
mode = \"jwt\"
[auth.jwt]
issuer = \"https://issuer.bench\"
audience = \"http://127.0.0.1:$PORT/r4\"
jwks = '{\"keys\":[{\"kty\":\"RSA\",\"kid\":\"bench\",\"alg\":\"RS256\",\"n\":\"$MODULUS\",\"e\":\"AQAB\"}]}'
algorithms = [\"RS256\"]" >"$WORK/jwt.toml"

# The client: N requests over 4 keep-alive connections, every answer checked.
cat >"$WORK/client.py" <<'PY'
import http.client, sys, threading
n, port, path, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
headers = {"Authorization": "Bearer " + token} if token else {}
failed = []
def run(k):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(k):
        c.request("GET", path, headers=headers)
        r = c.getresponse(); r.read()
        if r.status != 200: failed.append(r.status)
threads = [threading.Thread(target=run, args=(n // 4,)) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
sys.exit(f"answers other than 200: {sorted(set(failed))}" if failed else 0)
PY

# Instructions of one run of target $1 serving $2 requests.
run_once() {
  local target=$1 n=$2 out="$WORK/callgrind.$1.$2" path=/r4/Patient/example token="" stop=INT
  local cmd
  case $target in
    nginx) cmd=(nginx -c "$WORK/proxy/nginx.conf" -p "$WORK/proxy"); stop=QUIT ;;
    floor) cmd=("$FLOOR_BIN" "127.0.0.1:$PORT" "http://127.0.0.1:$UP/fhir" /r4) ;;
    floor_conn) cmd=(env FLOOR_CLIENT=conn "$FLOOR_BIN" "127.0.0.1:$PORT" "http://127.0.0.1:$UP/fhir" /r4) ;;
    smartgate) cmd=("$BIN" serve --config "$WORK/none.toml") ;;
    jwt) cmd=("$BIN" serve --config "$WORK/jwt.toml"); token=$TOKEN ;;
    verified) cmd=("$BIN" serve --config "$WORK/jwt.toml"); token=$TOKEN; path=/r4/Observation/obs-1 ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
  esac
  if [ "${cmd[0]}" = env ]; then
    env "${cmd[1]}" valgrind --tool=callgrind --callgrind-out-file="$out" "${cmd[@]:2}" 2>"$WORK/valgrind.log" &
  else
    valgrind --tool=callgrind --callgrind-out-file="$out" "${cmd[@]}" 2>"$WORK/valgrind.log" &
  fi
  local pid=$!
  for _ in $(seq 300); do
    curl -fsS -o /dev/null ${token:+-H "Authorization: Bearer $token"} "http://127.0.0.1:$PORT$path" 2>/dev/null && break
    sleep 0.2
  done
  python3 "$WORK/client.py" "$n" "$PORT" "$path" "$token"
  kill -"$stop" "$pid"
  wait "$pid" || true
  # One "summary:" line per output file (one file unless a process forks).
  cat "$out"* | awk '/^summary:/ {s += $2} END {print s}'
  # KEEP_CALLGRIND=DIR keeps the profiles, for callgrind_annotate.
  if [ -n "${KEEP_CALLGRIND:-}" ]; then
    mkdir -p "$KEEP_CALLGRIND"
    for f in "$out"*; do cp "$f" "$KEEP_CALLGRIND/$(basename "$f")"; done
  fi
  rm -f "$out"*
}

declare -A PER
for target in ${TARGETS:-nginx floor floor_conn smartgate jwt verified}; do
  a=$(run_once "$target" "$N1")
  b=$(run_once "$target" "$N2")
  PER[$target]=$(( (b - a) / (N2 - N1) ))
  echo "$target: ${PER[$target]} instructions/request" >&2
done

printf '\n%-34s %14s %9s\n' target "instr/request" "vs nginx"
for target in ${TARGETS:-nginx floor floor_conn smartgate jwt verified}; do
  ratio=$([ -n "${PER[nginx]:-}" ] && python3 -c "print(f'{${PER[$target]} / ${PER[nginx]}:.2f}')" || echo n/a)
  printf '%-34s %14s %9s\n' "$target" "${PER[$target]}" "$ratio"
done
echo "(callgrind, user space only; $N1 and $N2 requests over 4 keep-alive connections)"
