# Cold tokens, sourced by benches/load.sh after its proxy rounds (COLD=0 skips it): every
# request carries a JWT never seen before, RS256, ES256 and ES384, through
#   - smartgate (auth.mode = "jwt", default cache settings, deciding the SMART scopes),
#   - HAProxy (Debian haproxy 2.6) with jwt_verify and exp/iss/aud checks, on the very
#     same token files, rounds interleaved,
# with nginx proxy_pass measured in the same rounds (with one fixed token, which it does not
# read) as the proxying baseline. Then the memory rows: each process's peak RSS (VmHWM)
# and, for smartgate, its idle RSS and the token cache's entries.
#
# COLD_PER_RUN tokens are minted per algorithm and round (default 120000 for RS256 and
# ES256, half for ES384), each run COLD_DURATION seconds (default 3): enough that no run
# repeats a token (the "repeats" column says so; raise COLD_PER_RUN if it is not 0).
#
# Uses from load.sh: BIN, MINT_BIN, WORK, UP, NGX, NGINX_PROXY, ON_PROXY, ON_LOAD, THREADS,
# CONNECTIONS, DURATION, ROUNDS, PATH_UNDER_BASE, free_port, cpu_seconds, nginx_pids,
# median, ratio, paired.

command -v haproxy >/dev/null || { echo "the cold-token rows need haproxy (apt-get install -y haproxy)" >&2; exit 2; }

COLD_ALGS=${COLD_ALGS:-RS256 ES256 ES384}
SGC=$(free_port); SGCA=$(free_port)
declare -A HAP_PORT
ISS=https://issuer.bench
AUD="http://127.0.0.1:$SGC/r4"

per_run() { # tokens a run of $1 may use
  case $1 in ES384) echo $(( ${COLD_PER_RUN:-120000} / 2 )) ;; *) echo "${COLD_PER_RUN:-120000}" ;; esac
}
COLD_DURATION=${COLD_DURATION:-3}

# Keys (openssl), their public PEMs for HAProxy, the JWKS for smartgate, and the tokens:
# one file per algorithm and round, and a probe token.
JWKS_KEYS=()
for alg in $COLD_ALGS; do
  case $alg in
    RS256) openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/cold-$alg.pem" 2>/dev/null ;;
    ES256) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/cold-$alg.pem" 2>/dev/null ;;
    ES384) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$WORK/cold-$alg.pem" 2>/dev/null ;;
    *) echo "COLD_ALGS: RS256, ES256, ES384, not $alg" >&2; exit 2 ;;
  esac
  openssl pkey -in "$WORK/cold-$alg.pem" -pubout -out "$WORK/cold-$alg.pub.pem"
  mint() { "$MINT_BIN" "$alg" "$WORK/cold-$alg.pem" "cold-$alg" "$ISS" "$AUD" "$1" "$2"; }
  echo "minting $ROUNDS x $(per_run "$alg") $alg tokens" >&2
  JWKS_KEYS+=("$(mint 1 "$WORK/cold-$alg-probe.tokens")")
  for round in $(seq "$ROUNDS"); do
    mint "$(per_run "$alg")" "$WORK/cold-$alg-$round.tokens" >/dev/null
  done
  HAP_PORT[$alg]=$(free_port)
done
JWKS=$(IFS=,; echo "{\"keys\":[${JWKS_KEYS[*]}]}")

cat >"$WORK/smartgate-cold.toml" <<TOML
[server]
listen = "127.0.0.1:$SGC"
public_base_url = "$AUD"
[admin]
listen = "127.0.0.1:$SGCA"
[upstream]
url = "http://127.0.0.1:$UP/fhir"
pool_max_idle_per_host = 128
[auth]
mode = "jwt"
[auth.jwt]
issuer = "$ISS"
audience = "$AUD"
jwks = '$JWKS'
algorithms = [$(for a in $COLD_ALGS; do printf '"%s",' "$a"; done)]
$(quiet_tail)
TOML
"${ON_PROXY[@]}" "$BIN" serve --config "$WORK/smartgate-cold.toml" 2>"$WORK/smartgate-cold.log" &
PIDS+=($!)
SMARTGATE_COLD_PID=$!

# HAProxy: one frontend per algorithm, each checking alg, iss, aud, exp and the signature
# with jwt_verify against that algorithm's public key, then proxying with keep-alive.
{
  cat <<HAP
global
  maxconn 8192
  pidfile $WORK/haproxy.pid
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
backend fhir
  server up 127.0.0.1:$UP
HAP
  for alg in $COLD_ALGS; do
    cat <<HAP
frontend cold_$alg
  bind 127.0.0.1:${HAP_PORT[$alg]}
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('\$.alg')
  http-request deny unless { var(txn.alg) -m str $alg }
  http-request deny unless { var(txn.bearer),jwt_payload_query('\$.iss') -m str $ISS }
  http-request deny unless { var(txn.bearer),jwt_payload_query('\$.aud') -m str $AUD }
  http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('\$.exp','int')
  http-request set-var(txn.now) date()
  http-request deny if { var(txn.exp),sub(txn.now) -m int lt 0 }
  http-request deny unless { var(txn.bearer),jwt_verify(txn.alg,"$WORK/cold-$alg.pub.pem") -m int 1 }
  http-request replace-path /r4(.*) /fhir\1
  default_backend fhir
HAP
  done
} >"$WORK/haproxy.cfg"
haproxy -c -q -f "$WORK/haproxy.cfg" || { echo "haproxy refuses its configuration" >&2; exit 1; }
"${ON_PROXY[@]}" haproxy -f "$WORK/haproxy.cfg" -db 2>"$WORK/haproxy.log" &
PIDS+=($!)
HAPROXY_PID=$!

for _ in $(seq 100); do
  curl -fsS -o /dev/null "http://127.0.0.1:$SGCA/readyz" 2>/dev/null && break
  sleep 0.1
done
# A good token (one no run sends) through both; the same with a broken signature refused.
for alg in $COLD_ALGS; do
  probe=$(cat "$WORK/cold-$alg-probe.tokens")
  for url in "http://127.0.0.1:$SGC/r4$PATH_UNDER_BASE" "http://127.0.0.1:${HAP_PORT[$alg]}/r4$PATH_UNDER_BASE"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $probe" "$url")
    [ "$code" = 200 ] || { echo "$url refuses a good $alg token: $code" >&2; tail -5 "$WORK/smartgate-cold.log" "$WORK/haproxy.log" >&2; exit 1; }
    c=${probe: -10:1}; [ "$c" = A ] && r=B || r=A
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer ${probe:0:${#probe}-10}$r${probe: -9}" "$url")
    [ "$code" != 200 ] || { echo "$url accepts a $alg token with a broken signature" >&2; exit 1; }
  done
done
IDLE_KB=$(awk '/^VmRSS/ {print $2}' /proc/$SMARTGATE_COLD_PID/status)

# wrk with benches/cold.lua over the tokens of file $2 at URL $1; CPU measured over the
# PIDs after them. → "rps p99_ms cpu_us_per_request repeats requests"
measure_cold() {
  local url=$1 file=$2 out c0 c1 rps p99 total repeats cpu
  shift 2
  c0=$(cpu_seconds "$@")
  out=$("${ON_LOAD[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${COLD_DURATION}s" --latency -s benches/cold.lua "$url" -- "$file" "$THREADS")
  c1=$(cpu_seconds "$@")
  if grep -q "Non-2xx" <<<"$out"; then echo "non-2xx answers from $url" >&2; echo "$out" >&2; exit 1; fi
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' <<<"$out")
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  repeats=$(awk '/^repeats/ {print $2}' <<<"$out")
  cpu=$(python3 -c "
u0, s0 = map(float, '$c0'.split()); u1, s1 = map(float, '$c1'.split())
print(f'{(u1 - u0 + s1 - s0) * 1e6 / max($total, 1):.1f}')")
  echo "$rps $p99 $cpu $repeats $total"
}

declare -A CRPS CP99 CCPU CREP
COLD_REQUESTS=0
for round in $(seq "$ROUNDS"); do
  out=$(WRK_HEADER="Authorization: Bearer $TOKEN" measure "http://127.0.0.1:$NGX/r4$PATH_UNDER_BASE" $(nginx_pids "$NGINX_PROXY"))
  read -r rps p99 cpu _ <<<"$out"
  CRPS[nginx]+="$rps "; CP99[nginx]+="$p99 "; CCPU[nginx]+="$cpu "
  for alg in $COLD_ALGS; do
    tokens="$WORK/cold-$alg-$round.tokens"
    for who in smartgate haproxy; do
      perf_pid=
      if [ -n "${COLD_PERF:-}" ] && [ "$who-$alg-$round" = "smartgate-$COLD_PERF-1" ]; then
        # COLD_PERF=ALG: a perf profile of smartgate's first cold run of ALG.
        perf record -F 1999 -p "$SMARTGATE_COLD_PID" -o "${COLD_PERF_OUT:-perf-cold.data}" -- sleep "$COLD_DURATION" >/dev/null 2>&1 &
        perf_pid=$!
      fi
      if [ "$who" = smartgate ]; then
        out=$(measure_cold "http://127.0.0.1:$SGC/r4$PATH_UNDER_BASE" "$tokens" "$SMARTGATE_COLD_PID")
      else
        out=$(measure_cold "http://127.0.0.1:${HAP_PORT[$alg]}/r4$PATH_UNDER_BASE" "$tokens" "$HAPROXY_PID")
      fi
      [ -n "$perf_pid" ] && wait "$perf_pid"
      read -r rps p99 cpu repeats total <<<"$out"
      CRPS[$who-$alg]+="$rps "; CP99[$who-$alg]+="$p99 "; CCPU[$who-$alg]+="$cpu "
      CREP[$who-$alg]=$(( ${CREP[$who-$alg]:-0} + repeats ))
      [ "$who" = smartgate ] && COLD_REQUESTS=$(( COLD_REQUESTS + total ))
    done
  done
  echo "cold round $round/$ROUNDS done" >&2
done

hwm() { awk '/^VmHWM/ {print $2}' /proc/"$1"/status 2>/dev/null || echo 0; }
mib() { python3 -c "print(f'{$1 / 1024:.1f}')"; }
cache_entries=$(curl -fsS "http://127.0.0.1:$SGCA/metrics" | awk '/^smartgate_cache_entries\{cache="token"\}/ {print $2}')
n_rps=$(median "${CRPS[nginx]}"); n_p99=$(median "${CP99[nginx]}")
echo
echo "Cold tokens: every smartgate and HAProxy request a JWT never seen before ($COLD_REQUESTS through smartgate)"
printf '%-28s %10s %8s %9s %11s %11s %8s\n' target "req/s" "p99 ms" "vs nginx" "vs HAProxy" "CPU us/req" repeats
printf '%-28s %10.0f %8.2f %9s %11s %11s %8s\n' "nginx proxy_pass" "$n_rps" "$n_p99" 1.00 - "$(median "${CCPU[nginx]}")" -
for alg in $COLD_ALGS; do
  s_rps=$(median "${CRPS[smartgate-$alg]}"); h_rps=$(median "${CRPS[haproxy-$alg]}")
  printf '%-28s %10.0f %8.2f %9s %11s %11s %8s\n' "smartgate cold $alg" "$s_rps" "$(median "${CP99[smartgate-$alg]}")" "$(ratio "$s_rps" "$n_rps")" "$(ratio "$s_rps" "$h_rps")" "$(median "${CCPU[smartgate-$alg]}")" "${CREP[smartgate-$alg]}"
  printf '%-28s %10.0f %8.2f %9s %11s %11s %8s\n' "HAProxy jwt_verify $alg" "$h_rps" "$(median "${CP99[haproxy-$alg]}")" "$(ratio "$h_rps" "$n_rps")" 1.00 "$(median "${CCPU[haproxy-$alg]}")" "${CREP[haproxy-$alg]}"
done
for alg in $COLD_ALGS; do
  echo "smartgate / HAProxy cold $alg: throughput round by round $(paired "${CRPS[smartgate-$alg]}" "${CRPS[haproxy-$alg]}"); p99 $(ratio "$(median "${CP99[smartgate-$alg]}")" "$(median "${CP99[haproxy-$alg]}")")"
done
sg_peak=$(hwm "$SMARTGATE_COLD_PID")
echo
echo "Memory (peak RSS, VmHWM)"
printf '%-44s %10s\n' process MiB
printf '%-44s %10s\n' "smartgate, idle (RSS at start)" "$(mib "$IDLE_KB")"
printf '%-44s %10s\n' "smartgate, after the cold runs" "$(mib "$sg_peak")"
printf '%-44s %10s\n' "smartgate, cached token (one token)" "$(mib "$(hwm "$SMARTGATE_JWT_PID")")"
printf '%-44s %10s\n' "HAProxy" "$(mib "$(hwm "$HAPROXY_PID")")"
nginx_kb=0; for p in $(nginx_pids "$NGINX_PROXY"); do nginx_kb=$(( nginx_kb + $(hwm "$p") )); done
printf '%-44s %10s\n' "nginx (master and workers)" "$(mib "$nginx_kb")"
echo "smartgate token cache: $cache_entries entries (auth.cache_max_entries default 100000) after $COLD_REQUESTS distinct tokens; peak - idle = $(python3 -c "print(f'{($sg_peak - $IDLE_KB) * 1024 / max(${cache_entries:-1}, 1):.0f}')") bytes per cached token (an upper bound: everything else the run grew is counted in)"

# SOAK=SECONDS: then a soak with rotating tokens through smartgate alone: the ES256 token
# files of every round, sent over and over (the pool is larger than the token cache, so
# the cache keeps evicting), with smartgate's RSS sampled every 10 s. Flat means the
# samples after the first minute stay within ±10 % of their mean.
if [ -n "${SOAK:-}" ]; then
  cat "$WORK"/cold-ES256-*.tokens >"$WORK/soak.tokens"
  echo "soak: ${SOAK}s, $(wc -l <"$WORK/soak.tokens") rotating ES256 tokens" >&2
  (
    for _ in $(seq $((SOAK / 10))); do
      sleep 10
      awk '/^VmRSS/ {print $2}' /proc/"$SMARTGATE_COLD_PID"/status
    done
  ) >"$WORK/soak.rss" &
  sampler=$!
  out=$("${ON_LOAD[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${SOAK}s" --latency -s benches/cold.lua "http://127.0.0.1:$SGC/r4$PATH_UNDER_BASE" -- "$WORK/soak.tokens" "$THREADS")
  wait "$sampler" || true
  if grep -q "Non-2xx" <<<"$out"; then echo "non-2xx answers during the soak" >&2; echo "$out" >&2; exit 1; fi
  echo
  echo "Soak: $(awk '/requests in/ {print $1}' <<<"$out") requests in ${SOAK}s, $(awk '/^Requests\/sec/ {print $2}' <<<"$out") req/s"
  python3 - "$WORK/soak.rss" <<'PY'
import sys
kb = [int(l) for l in open(sys.argv[1]) if l.strip()]
settled = kb[6:] or kb
mean = sum(settled) / len(settled)
print("RSS MiB every 10 s:", " ".join(f"{k / 1024:.1f}" for k in kb))
print(f"after the first minute: min {min(settled) / 1024:.1f}, max {max(settled) / 1024:.1f}, "
      f"mean {mean / 1024:.1f} MiB; spread {100 * (max(settled) - mean) / mean:+.1f} % / "
      f"{100 * (min(settled) - mean) / mean:+.1f} % of the mean")
PY
fi
