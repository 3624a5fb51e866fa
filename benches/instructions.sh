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
# keep-alive connections, counted from its first answer on; (instructions(N2) - instructions(N1)) / (N2 - N1) is the cost
# of one request with start-up and shutdown taken out. Targets:
#   nginx      nginx proxy_pass with upstream keepalive (one worker, no master)
#   nginx_same the same nginx doing smartgate's per-request header work (common.sh)
#   floor      benches/hyper_floor.rs with hyper-util's pooled client
#   floor_conn benches/hyper_floor.rs with hyper connection-level senders
#   smartgate  smartgate pass-through (auth.mode = "none")
#   jwt        smartgate with a JWT (RS256, cached after first use) and a SMART decision:
#              a user/ token, the answer passed on unread
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
# shellcheck source=benches/common.sh
. benches/common.sh
build_binaries
UP=$(free_port); PORT=$(free_port); ADMIN=$(free_port)

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
nginx_conf proxy "worker_processes 1; master_process off; daemon off;" < <(proxy_server "$UP" "$PORT")

gateway_conf() { # $1 = [auth] section
  cat <<TOML
[server]
listen = "127.0.0.1:$PORT"
public_base_url = "http://127.0.0.1:$PORT/r4"
[admin]
listen = "127.0.0.1:$ADMIN"
[upstream]
url = "http://127.0.0.1:$UP/fhir"
$(quiet_tail)
$1
TOML
}
gateway_conf $'[auth]\nmode = "none"' >"$WORK/none.toml"

# A JWT for the jwt and verified targets: RS256, JWKS inline.
bench_token "http://127.0.0.1:$PORT/r4"
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
    nginx_same) cmd=(nginx -c "$WORK/proxy/nginx.conf" -p "$WORK/proxy"); stop=QUIT; path=/same/Patient/example ;;
    floor) cmd=("$FLOOR_BIN" "127.0.0.1:$PORT" "http://127.0.0.1:$UP/fhir" /r4) ;;
    floor_conn) cmd=(env FLOOR_CLIENT=conn "$FLOOR_BIN" "127.0.0.1:$PORT" "http://127.0.0.1:$UP/fhir" /r4) ;;
    smartgate) cmd=("$BIN" serve --config "$WORK/none.toml") ;;
    jwt) cmd=("$BIN" serve --config "$WORK/jwt.toml"); token=$USER_TOKEN ;;
    verified) cmd=("$BIN" serve --config "$WORK/jwt.toml"); token=$TOKEN; path=/r4/Observation/obs-1 ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
  esac
  if [ "${cmd[0]}" = env ]; then
    env "${cmd[1]}" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" "${cmd[@]:2}" 2>"$WORK/valgrind.log" &
  else
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" "${cmd[@]}" 2>"$WORK/valgrind.log" &
  fi
  local pid=$!
  for _ in $(seq 300); do
    curl -fsS -o /dev/null ${token:+-H "Authorization: Bearer $token"} "http://127.0.0.1:$PORT$path" 2>/dev/null && break
    sleep 0.2
  done
  # Counted from here: start-up work varies from run to run (aws-lc seeds its random
  # generator from timing jitter, hundreds of millions of instructions under valgrind)
  # and would not cancel out between the two runs.
  callgrind_control --instr=on "$pid" >/dev/null
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
for target in ${TARGETS:-nginx nginx_same floor floor_conn smartgate jwt verified}; do
  a=$(run_once "$target" "$N1")
  b=$(run_once "$target" "$N2")
  PER[$target]=$(( (b - a) / (N2 - N1) ))
  echo "$target: ${PER[$target]} instructions/request" >&2
done

printf '\n%-34s %14s %9s\n' target "instr/request" "vs nginx"
for target in ${TARGETS:-nginx nginx_same floor floor_conn smartgate jwt verified}; do
  ratio=$([ -n "${PER[nginx]:-}" ] && python3 -c "print(f'{${PER[$target]} / ${PER[nginx]}:.2f}')" || echo n/a)
  printf '%-34s %14s %9s\n' "$target" "${PER[$target]}" "$ratio"
done
echo "(callgrind, user space only; $N1 and $N2 requests over 4 keep-alive connections)"
