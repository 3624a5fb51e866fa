#!/usr/bin/env bash
# Whole-proxy load test: the same tiny static FHIR upstream measured, in one run,
#   1. direct,
#   2. through nginx proxy_pass with upstream keepalive (the baseline), through the same
#      nginx doing smartgate's per-request header work (nginx_same, see common.sh), and
#      through nginx with its workers pinned one per CPU (nginx_pinned:
#      worker_cpu_affinity auto, what smartgate does by default),
#   3. through smartgate (auth.mode = "none": pass-through),
#   4. through benches/hyper_floor.rs: the same stack (tokio, hyper's server, a stack of
#      hyper connection-level senders per worker) with none of smartgate's work, the floor
#      a hyper proxy stands on,
# and any extra smartgate configurations given as scenarios (see SCENARIOS below);
# then (benches/cold.sh, COLD=0 skips it) cold tokens: RS256, ES256 and ES384 JWTs never
# seen before through smartgate and through HAProxy's jwt_verify on the same token files,
# nginx alongside, and each process's peak memory.
# Opt-in target floor_slow: the hyper floor made slower on purpose (FLOOR_SPIN rounds of
# arithmetic per request, default 1500), which shows how p99 at saturation on a machine
# shared with the load generator moves with the proxy's cost:
#   TARGETS="nginx floor floor_slow smartgate" ROUNDS=7 TOKEN_RUN=0 benches/load.sh
# Prints requests/s and p99 latency for each, and ratios to nginx and to direct.
#
# LAYOUT=shared (the default): every process may run on every CPU, the proxies with one
# worker per CPU, as a small machine running everything would; smartgate and the floor
# pin each worker to a CPU of its own (server.worker_cpu_affinity = "auto"), nginx only
# in nginx_pinned. The load generator and the upstream compete with the proxy for the
# same cores, so p99 at saturation shows how the proxy's threads fare under the
# scheduler: two busy workers sharing one CPU put a scheduler tick into it.
# LAYOUT=pinned: each proxy has CPU 0 to itself with one worker; the upstream and wrk
# (one thread) share CPU 1. The proxy is then the bottleneck, so throughput measures its
# cost per request and p99 its fairness, without the load generator in between.
#   LAYOUT=pinned TARGETS="nginx smartgate" TOKEN_RUN=0 benches/load.sh
#
#   benches/load.sh                 # 3 rounds x 5 s per target, 64 connections
#   ROUNDS=5 DURATION=5 CONNECTIONS=32 benches/load.sh
#   TARGETS="nginx smartgate" TOKEN_RUN=0 benches/load.sh   # a subset, no token endpoint run
#
# The targets are measured in interleaved rounds and each figure is the median over the
# rounds: on a shared 2-core machine one run can be off by 10 %.
#
# SOAK=600 adds a 10-minute soak with rotating tokens after the cold rows (benches/cold.sh).
# Needs nginx, wrk and haproxy (Debian: apt-get install -y nginx wrk haproxy) and a release build
# (the script runs `cargo build --release`). Everything listens on 127.0.0.1 only and
# every run is bounded by DURATION. Machines here are shared and noisy: read the ratios,
# not the absolute numbers, and compare only figures from the same run.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
LAYOUT=${LAYOUT:-shared}
case $LAYOUT in
  shared) ON_PROXY=(); ON_LOAD=(); PROXY_WORKERS=auto; THREADS=${THREADS:-2} ;;
  pinned)
    [ "$(nproc)" -ge 2 ] || { echo "LAYOUT=pinned needs two CPUs" >&2; exit 2; }
    command -v taskset >/dev/null || { echo "LAYOUT=pinned needs taskset (util-linux)" >&2; exit 2; }
    # smartgate and the floor start one worker per CPU they may use: one.
    ON_PROXY=(taskset -c 0); ON_LOAD=(taskset -c 1); PROXY_WORKERS=1; THREADS=${THREADS:-1} ;;
  *) echo "LAYOUT is shared or pinned, not $LAYOUT" >&2; exit 2 ;;
esac
UPSTREAM_TYPE=${UPSTREAM_TYPE:-application/fhir+json}
PATH_UNDER_BASE=${PATH_UNDER_BASE:-/Patient/example}

for tool in nginx wrk; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install -y nginx wrk)" >&2; exit 2; }
done
# shellcheck source=benches/common.sh
. benches/common.sh
build_binaries
UP=$(free_port); NGX=$(free_port); NGP=$(free_port); SG=$(free_port); SGA=$(free_port); SGJ=$(free_port); SGJA=$(free_port)
FLR=$(free_port); FLS=$(free_port)

VERIFIED_PATH=/Observation/obs-1

# nginx instance $1 (upstream | proxy | proxy_pinned), with worker count $2 and server
# blocks on stdin, run by the command prefix in the array named $3 (the layout's CPUs),
# with more main-context directives in $4.
start_nginx() {
  local -n on=$3
  nginx_conf "$1" "worker_processes $2; ${4:-}"
  "${on[@]}" nginx -c "$WORK/$1/nginx.conf" -p "$WORK/$1" -g 'daemon off;' &
  PIDS+=($!)
  eval "NGINX_${1^^}=$!"
}

# The tiny static upstream: its own nginx process, the same for every target.
start_nginx upstream 1 ON_LOAD <<NGINX
  server {
    listen 127.0.0.1:$UP;
    location /fhir/ {
      default_type $UPSTREAM_TYPE;
      return 200 '$PATIENT';
    }
    location /fhir/Observation/ {
      default_type application/fhir+json;
      return 200 '$OBS';
    }
  }
NGINX

# The baseline proxy: as many workers as smartgate has (one per CPU it may use).
start_nginx proxy "$PROXY_WORKERS" ON_PROXY < <(proxy_server "$UP" "$NGX")
start_nginx proxy_pinned "$PROXY_WORKERS" ON_PROXY "worker_cpu_affinity auto;" < <(proxy_server "$UP" "$NGP")

cat >"$WORK/smartgate.toml" <<TOML
[server]
listen = "127.0.0.1:$SG"
public_base_url = "http://127.0.0.1:$SG/r4"
[admin]
listen = "127.0.0.1:$SGA"
[upstream]
url = "http://127.0.0.1:$UP/fhir"
pool_max_idle_per_host = 128
[auth]
mode = "none"
$(quiet_tail)
TOML
"${ON_PROXY[@]}" "$BIN" serve --config "$WORK/smartgate.toml" 2>"$WORK/smartgate.log" &
PIDS+=($!)
SMARTGATE_PID=$!
FLOOR_CLIENT=conn "${ON_PROXY[@]}" "$FLOOR_BIN" "127.0.0.1:$FLR" "http://127.0.0.1:$UP/fhir" /r4 2>"$WORK/floor.log" &
PIDS+=($!)
FLOOR_PID=$!
FLOOR_SPIN=${FLOOR_SPIN:-1500} FLOOR_CLIENT=conn "${ON_PROXY[@]}" "$FLOOR_BIN" "127.0.0.1:$FLS" "http://127.0.0.1:$UP/fhir" /r4 2>"$WORK/floor-slow.log" &
PIDS+=($!)
FLOOR_SLOW_PID=$!

# JWT mode: an RS256 key, its JWKS inline in the configuration, and the bench tokens
# (each cached by the gateway after its first use, as a client's token is).
bench_token "http://127.0.0.1:$SGJ/r4"
JWKS="{\\\"keys\\\":[{\\\"kty\\\":\\\"RSA\\\",\\\"kid\\\":\\\"bench\\\",\\\"alg\\\":\\\"RS256\\\",\\\"n\\\":\\\"$MODULUS\\\",\\\"e\\\":\\\"AQAB\\\"}]}"

cat >"$WORK/smartgate-jwt.toml" <<TOML
[server]
listen = "127.0.0.1:$SGJ"
public_base_url = "http://127.0.0.1:$SGJ/r4"
[admin]
listen = "127.0.0.1:$SGJA"
[upstream]
url = "http://127.0.0.1:$UP/fhir"
pool_max_idle_per_host = 128
[auth]
mode = "jwt"
[auth.jwt]
issuer = "https://issuer.bench"
audience = "http://127.0.0.1:$SGJ/r4"
jwks = "$JWKS"
algorithms = ["RS256"]
$(quiet_tail)
TOML
"${ON_PROXY[@]}" "$BIN" serve --config "$WORK/smartgate-jwt.toml" 2>"$WORK/smartgate-jwt.log" &
PIDS+=($!)
SMARTGATE_JWT_PID=$!

# The embedded authorization server: token requests per second from a symmetric client
# (client_secret_basic, so wrk can repeat one request; an assertion may be used only once).
SGT=$(free_port); SGTA=$(free_port)
"$BIN" keygen --alg ES384 --out "$WORK/gateway-es384.pem" >/dev/null 2>&1
"$BIN" keygen --alg ES256 --out "$WORK/gateway-es256.pem" >/dev/null 2>&1
SECRET_HASH=$(printf 'bench-secret' | sha256sum | cut -d' ' -f1)
token_config() { # $1 = alg
  cat <<TOML
[server]
listen = "127.0.0.1:$SGT"
public_base_url = "http://127.0.0.1:$SGT/r4"
[admin]
listen = "127.0.0.1:$SGTA"
[upstream]
url = "http://127.0.0.1:$UP/fhir"
[auth]
mode = "embedded"
$(quiet_tail)
[authorization_server]
enabled = true
signing_key = "$WORK/gateway-${1,,}.pem"
signing_alg = "$1"
rate_limit = 1000000
[[authorization_server.clients]]
client_id = "bench"
client_secret_hash = "sha256:$SECRET_HASH"
scope = "system/*.rs"
TOML
}
cat >"$WORK/token.lua" <<LUA
wrk.method = "POST"
wrk.body = "grant_type=client_credentials&scope=system%2FPatient.rs"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic $(printf 'bench:bench-secret' | base64)"
LUA

wait_up() {
  for _ in $(seq 100); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "not up: $1" >&2; tail -5 "$WORK"/*.log >&2; exit 1
}
wait_up "http://127.0.0.1:$UP/fhir$PATH_UNDER_BASE"
wait_up "http://127.0.0.1:$NGX/r4$PATH_UNDER_BASE"
wait_up "http://127.0.0.1:$NGP/r4$PATH_UNDER_BASE"
wait_up "http://127.0.0.1:$SG/r4$PATH_UNDER_BASE"
wait_up "http://127.0.0.1:$FLR/r4$PATH_UNDER_BASE"
wait_up "http://127.0.0.1:$FLS/r4$PATH_UNDER_BASE"
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $USER_TOKEN" "http://127.0.0.1:$SGJ/r4$PATH_UNDER_BASE" || true)
  [ "$code" = 200 ] && break
  sleep 0.1
done
[ "$code" = 200 ] || { echo "smartgate (jwt) does not accept the bench token: $code" >&2; tail -5 "$WORK/smartgate-jwt.log" >&2; exit 1; }
[ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$SGJ/r4$VERIFIED_PATH")" = 200 ] \
  || { echo "smartgate (jwt) refuses the verified read" >&2; exit 1; }
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$SGJ/r4$PATH_UNDER_BASE")" = 401 ] \
  || { echo "smartgate (jwt) let a request without a token through" >&2; exit 1; }

# Same answer through both proxies (modulo headers).
diff <(curl -fsS "http://127.0.0.1:$NGX/r4$PATH_UNDER_BASE") \
     <(curl -fsS "http://127.0.0.1:$SG/r4$PATH_UNDER_BASE") >/dev/null \
  || { echo "proxies disagree on the body" >&2; exit 1; }

# CPU seconds used so far by the processes given as PIDs: "user system".
cpu_seconds() {
  local user=0 sys=0 pid u s
  for pid in "$@"; do
    for task in /proc/"$pid"/task/*/stat; do
      read -r u s < <(awk '{print $14, $15}' "$task" 2>/dev/null || echo 0 0)
      user=$((user + u)); sys=$((sys + s))
    done
  done
  python3 -c "print($user / $(getconf CLK_TCK), $sys / $(getconf CLK_TCK))"
}

# wrk's summary → "rps p99_ms cpu_us_per_request user_us sys_us", the CPU measured over
# the processes whose PIDs follow the URL.
# WRK_HEADER, when set, is sent with every request.
measure() {
  local out rps p99 url=$1 c0 c1 cpu_per_req
  shift
  c0=$(cpu_seconds "$@")
  out=$("${ON_LOAD[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency ${WRK_HEADER:+-H "$WRK_HEADER"} "$url")
  c1=$(cpu_seconds "$@")
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' <<<"$out")
  if grep -q "Non-2xx" <<<"$out"; then echo "non-2xx answers from $url" >&2; echo "$out" >&2; exit 1; fi
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  cpu_per_req=$(python3 -c "
u0, s0 = map(float, '$c0'.split()); u1, s1 = map(float, '$c1'.split()); n = max($total, 1)
print(f'{(u1 - u0 + s1 - s0) * 1e6 / n:.1f} {(u1 - u0) * 1e6 / n:.2f} {(s1 - s0) * 1e6 / n:.2f}')")
  echo "$rps $p99 $cpu_per_req"
}

# Warm-up, then the measured runs, back to back.
"${ON_LOAD[@]}" wrk -t1 -c8 -d2s "http://127.0.0.1:$SG/r4$PATH_UNDER_BASE" >/dev/null
"${ON_LOAD[@]}" wrk -t1 -c8 -d2s "http://127.0.0.1:$NGX/r4$PATH_UNDER_BASE" >/dev/null

# nginx's master process does no request work; its workers are its children.
nginx_pids() { echo "$1" $(pgrep -P "$1"); }
# Every target gets the identical request, token included, so the JWT ratio measures
# validation rather than the extra header bytes (nginx and pass-through ignore it). The
# jwt target's token is USER_TOKEN (user/*.rs: the decision alone, the answer passed on);
# the verified read and its nginx baseline carry TOKEN (patient/*.rs: the answer is
# checked against the patient's compartment).
export WRK_HEADER="Authorization: Bearer $USER_TOKEN"
PATIENT_HEADER="Authorization: Bearer $TOKEN"
declare -A RPS P99 CPU USR SYS
for round in $(seq "$ROUNDS"); do
  for target in ${TARGETS:-direct nginx nginx_pinned nginx_same floor smartgate jwt nginx_obs verified}; do
    case $target in
      nginx_obs) out=$(WRK_HEADER=$PATIENT_HEADER measure "http://127.0.0.1:$NGX/r4$VERIFIED_PATH" $(nginx_pids "$NGINX_PROXY")) ;;
      verified) out=$(WRK_HEADER=$PATIENT_HEADER measure "http://127.0.0.1:$SGJ/r4$VERIFIED_PATH" "$SMARTGATE_JWT_PID") ;;
      direct) out=$(measure "http://127.0.0.1:$UP/fhir$PATH_UNDER_BASE" $(nginx_pids "$NGINX_UPSTREAM")) ;;
      nginx) out=$(measure "http://127.0.0.1:$NGX/r4$PATH_UNDER_BASE" $(nginx_pids "$NGINX_PROXY")) ;;
      nginx_pinned) out=$(measure "http://127.0.0.1:$NGP/r4$PATH_UNDER_BASE" $(nginx_pids "$NGINX_PROXY_PINNED")) ;;
      nginx_same) out=$(measure "http://127.0.0.1:$NGX/same$PATH_UNDER_BASE" $(nginx_pids "$NGINX_PROXY")) ;;
      floor) out=$(measure "http://127.0.0.1:$FLR/r4$PATH_UNDER_BASE" "$FLOOR_PID") ;;
      floor_slow) out=$(measure "http://127.0.0.1:$FLS/r4$PATH_UNDER_BASE" "$FLOOR_SLOW_PID") ;;
      smartgate) out=$(measure "http://127.0.0.1:$SG/r4$PATH_UNDER_BASE" "$SMARTGATE_PID") ;;
      jwt) out=$(measure "http://127.0.0.1:$SGJ/r4$PATH_UNDER_BASE" "$SMARTGATE_JWT_PID") ;;
    esac
    read -r rps p99 cpu usr sys <<<"$out"
    RPS[$target]+="$rps "; P99[$target]+="$p99 "; CPU[$target]+="$cpu "
    USR[$target]+="$usr "; SYS[$target]+="$sys "
  done
  echo "round $round/$ROUNDS done" >&2
done
# Token issuance, once per signing algorithm (after the proxy rounds).
declare -A TOKEN_RPS
for alg in $([ "${TOKEN_RUN:-1}" = 1 ] && echo ES384 ES256); do
  token_config "$alg" >"$WORK/smartgate-token.toml"
  "${ON_PROXY[@]}" "$BIN" serve --config "$WORK/smartgate-token.toml" 2>"$WORK/smartgate-token.log" &
  TOKEN_PID=$!
  for _ in $(seq 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$SGTA/readyz" 2>/dev/null && break
    sleep 0.1
  done
  code=$(curl -s -o /dev/null -w '%{http_code}' -u bench:bench-secret -d grant_type=client_credentials -d scope=system/Patient.rs "http://127.0.0.1:$SGT/r4/auth/token")
  [ "$code" = 200 ] || { echo "token endpoint answers $code" >&2; tail -5 "$WORK/smartgate-token.log" >&2; exit 1; }
  out=$("${ON_LOAD[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" -s "$WORK/token.lua" "http://127.0.0.1:$SGT/r4/auth/token")
  if grep -q "Non-2xx" <<<"$out"; then echo "non-2xx answers from the token endpoint" >&2; echo "$out" >&2; exit 1; fi
  TOKEN_RPS[$alg]=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  kill "$TOKEN_PID"; wait "$TOKEN_PID" 2>/dev/null || true
done

median() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(statistics.median(v) if v else 'nan')" $1; }
d_rps=$(median "${RPS[direct]:-}"); d_p99=$(median "${P99[direct]:-}"); d_cpu=$(median "${CPU[direct]:-}")
n_rps=$(median "${RPS[nginx]:-}"); n_p99=$(median "${P99[nginx]:-}"); n_cpu=$(median "${CPU[nginx]:-}")
p_rps=$(median "${RPS[nginx_pinned]:-}"); p_p99=$(median "${P99[nginx_pinned]:-}"); p_cpu=$(median "${CPU[nginx_pinned]:-}")
e_rps=$(median "${RPS[nginx_same]:-}"); e_p99=$(median "${P99[nginx_same]:-}"); e_cpu=$(median "${CPU[nginx_same]:-}")
f_rps=$(median "${RPS[floor]:-}"); f_p99=$(median "${P99[floor]:-}"); f_cpu=$(median "${CPU[floor]:-}")
w_rps=$(median "${RPS[floor_slow]:-}"); w_p99=$(median "${P99[floor_slow]:-}"); w_cpu=$(median "${CPU[floor_slow]:-}")
s_rps=$(median "${RPS[smartgate]:-}"); s_p99=$(median "${P99[smartgate]:-}"); s_cpu=$(median "${CPU[smartgate]:-}")
j_rps=$(median "${RPS[jwt]:-}"); j_p99=$(median "${P99[jwt]:-}"); j_cpu=$(median "${CPU[jwt]:-}")
o_rps=$(median "${RPS[nginx_obs]:-}"); o_p99=$(median "${P99[nginx_obs]:-}"); o_cpu=$(median "${CPU[nginx_obs]:-}")
v_rps=$(median "${RPS[verified]:-}"); v_p99=$(median "${P99[verified]:-}"); v_cpu=$(median "${CPU[verified]:-}")

ratio() { python3 -c "
a, b = float('$1' or 'nan'), float('$2' or 'nan')
print(f'{a/b:.2f}' if b == b and b else 'n/a')"; }
printf '\n%-24s %10s %8s %9s %10s %14s\n' target "req/s" "p99 ms" "vs nginx" "vs direct" "CPU us/req"
printf '%-24s %10.0f %8.2f %9s %10s %14s\n' "direct (upstream)" "$d_rps" "$d_p99" "$(ratio "$d_rps" "$n_rps")" 1.00 "$d_cpu (upstream)"
printf '%-24s %10.0f %8.2f %9s %10s %14s\n' "nginx proxy_pass" "$n_rps" "$n_p99" 1.00 "$(ratio "$n_rps" "$d_rps")" "$n_cpu (proxy)"
printf '%-24s %10.0f %8.2f %9s %10s %14s\n' "nginx, workers pinned" "$p_rps" "$p_p99" "$(ratio "$p_rps" "$n_rps")" "$(ratio "$p_rps" "$d_rps")" "$p_cpu (proxy)"
printf '%-24s %10.0f %8.2f %9s %10s %14s\n' "nginx, same header work" "$e_rps" "$e_p99" "$(ratio "$e_rps" "$n_rps")" "$(ratio "$e_rps" "$d_rps")" "$e_cpu (proxy)"
printf '%-24s %10.0f %8.2f %9s %10s %14s\n' "hyper floor (bare proxy)" "$f_rps" "$f_p99" "$(ratio "$f_rps" "$n_rps")" "$(ratio "$f_rps" "$d_rps")" "$f_cpu (proxy)"
[ -n "${RPS[floor_slow]:-}" ] && printf '%-24s %10.0f %8.2f %9s %10s %14s\n' "hyper floor, slowed" "$w_rps" "$w_p99" "$(ratio "$w_rps" "$n_rps")" "$(ratio "$w_rps" "$d_rps")" "$w_cpu (proxy)"
printf '%-24s %10.0f %8.2f %9s %10s %14s\n' "smartgate pass-through" "$s_rps" "$s_p99" "$(ratio "$s_rps" "$n_rps")" "$(ratio "$s_rps" "$d_rps")" "$s_cpu (proxy)"
printf '%-24s %10.0f %8.2f %9s %10s %14s\n' "smartgate JWT, user/" "$j_rps" "$j_p99" "$(ratio "$j_rps" "$n_rps")" "$(ratio "$j_rps" "$d_rps")" "$j_cpu (proxy)"
printf '%-24s %10.0f %8.2f %9s %10s %14s\n' "nginx, Observation" "$o_rps" "$o_p99" 1.00 - "$o_cpu (proxy)"
printf '%-24s %10.0f %8.2f %9s %10s %14s\n' "smartgate verified read" "$v_rps" "$v_p99" "$(ratio "$v_rps" "$o_rps")" - "$v_cpu (proxy)"
echo
echo "verified read (patient/ token, Observation checked against the compartment) / nginx: throughput $(ratio "$v_rps" "$o_rps"), p99 $(ratio "$v_p99" "$o_p99"), CPU per request $(ratio "$v_cpu" "$o_cpu")"
echo "verified read / JWT read with the answer passed on (user/ token): throughput $(ratio "$v_rps" "$j_rps")"
echo "smartgate / nginx: throughput $(ratio "$s_rps" "$n_rps"), p99 $(ratio "$s_p99" "$n_p99"), CPU per request $(ratio "$s_cpu" "$n_cpu")"
[ -n "${RPS[nginx_pinned]:-}" ] && echo "smartgate / nginx with workers pinned: throughput $(ratio "$s_rps" "$p_rps"), p99 $(ratio "$s_p99" "$p_p99"), CPU per request $(ratio "$s_cpu" "$p_cpu")"
# Round by round (each pair measured minutes apart at most): the spread of the ratio.
paired() { python3 -c "
import statistics, sys
a = [float(x) for x in sys.argv[1].split()]
b = [float(x) for x in sys.argv[2].split()]
r = sorted(x / y for x, y in zip(a, b) if y)
print(f'median {statistics.median(r):.2f}, range {r[0]:.2f}-{r[-1]:.2f} over {len(r)} rounds' if r else 'n/a')
" "$1" "$2"; }
[ -n "${RPS[smartgate]:-}" ] && [ -n "${RPS[nginx]:-}" ] && echo "smartgate / nginx throughput, round by round: $(paired "${RPS[smartgate]}" "${RPS[nginx]}")"
[ -n "${RPS[smartgate]:-}" ] && [ -n "${RPS[nginx]:-}" ] && echo "smartgate / nginx p99, round by round: $(paired "${P99[smartgate]}" "${P99[nginx]}")"
[ -n "${RPS[smartgate]:-}" ] && [ -n "${RPS[nginx_pinned]:-}" ] && echo "smartgate / nginx with workers pinned, round by round: throughput $(paired "${RPS[smartgate]}" "${RPS[nginx_pinned]}"); p99 $(paired "${P99[smartgate]}" "${P99[nginx_pinned]}")"
[ -n "${RPS[smartgate]:-}" ] && [ -n "${RPS[nginx_same]:-}" ] && echo "smartgate / nginx doing the same header work: throughput $(ratio "$s_rps" "$e_rps"), p99 $(ratio "$s_p99" "$e_p99"), CPU per request $(ratio "$s_cpu" "$e_cpu"); round by round: $(paired "${RPS[smartgate]}" "${RPS[nginx_same]}")"
[ -n "${RPS[floor]:-}" ] && [ -n "${RPS[nginx]:-}" ] && echo "hyper floor / nginx throughput, round by round: $(paired "${RPS[floor]}" "${RPS[nginx]}")"
[ -n "${RPS[jwt]:-}" ] && [ -n "${RPS[nginx]:-}" ] && echo "JWT + decision (user/ token) / nginx, round by round: throughput $(paired "${RPS[jwt]}" "${RPS[nginx]}"); p99 $(paired "${P99[jwt]}" "${P99[nginx]}")"
[ -n "${RPS[verified]:-}" ] && [ -n "${RPS[nginx_obs]:-}" ] && echo "verified read / nginx (same path), round by round: throughput $(paired "${RPS[verified]}" "${RPS[nginx_obs]}"); p99 $(paired "${P99[verified]}" "${P99[nginx_obs]}")"
echo "hyper floor / nginx: throughput $(ratio "$f_rps" "$n_rps"), p99 $(ratio "$f_p99" "$n_p99"), CPU per request $(ratio "$f_cpu" "$n_cpu")"
[ -n "${RPS[floor_slow]:-}" ] && echo "slowed floor (FLOOR_SPIN=${FLOOR_SPIN:-1500}) / floor: throughput $(ratio "$w_rps" "$f_rps"), p99 $(ratio "$w_p99" "$f_p99"), CPU per request $(ratio "$w_cpu" "$f_cpu"); slowed floor / nginx: p99 $(ratio "$w_p99" "$n_p99")"
echo "smartgate / hyper floor: throughput $(ratio "$s_rps" "$f_rps"), p99 $(ratio "$s_p99" "$f_p99"), CPU per request $(ratio "$s_cpu" "$f_cpu")"
echo "smartgate JWT + decision / pass-through: throughput $(ratio "$j_rps" "$s_rps"), p99 $(ratio "$j_p99" "$s_p99"), CPU per request $(ratio "$j_cpu" "$s_cpu")"
[ "${TOKEN_RUN:-1}" = 1 ] && echo "embedded /auth/token (client_secret_basic, sign an access token): ES384 ${TOKEN_RPS[ES384]} req/s, ES256 ${TOKEN_RPS[ES256]} req/s; ES256/ES384 $(ratio "${TOKEN_RPS[ES256]}" "${TOKEN_RPS[ES384]}"); ES384 tokens / nginx proxied reads $(ratio "${TOKEN_RPS[ES384]}" "$n_rps")"
# Where each proxy's CPU per request goes: its own code (user) and the kernel's TCP work
# on its behalf (system).
echo
printf '%-16s %14s %14s\n' target "user us/req" "system us/req"
for target in ${TARGETS:-direct nginx nginx_pinned nginx_same floor smartgate jwt nginx_obs verified}; do
  printf '%-16s %14s %14s\n' "$target" "$(median "${USR[$target]:-}")" "$(median "${SYS[$target]:-}")"
done
# p99 at saturation here jumps between rounds (one scheduler tick more or less), so the
# rounds themselves are worth seeing, not only their median.
echo
for target in ${TARGETS:-direct nginx nginx_pinned nginx_same floor smartgate jwt nginx_obs verified}; do
  printf '%-16s p99 ms by round: %s\n' "$target" "${P99[$target]:-}"
done
echo "(medians of $ROUNDS interleaved rounds, ${DURATION}s per target each, $CONNECTIONS connections, $THREADS wrk threads, $(nproc) cores, layout $LAYOUT)"
# Cold tokens against HAProxy's jwt_verify, and the memory rows (benches/cold.sh).
if [ "${COLD:-1}" = 1 ]; then
  # shellcheck source=benches/cold.sh
  . benches/cold.sh
  echo "(cold rows: medians of $ROUNDS interleaved rounds, ${COLD_DURATION}s per target each)"
fi
