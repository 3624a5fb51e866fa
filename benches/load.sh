#!/usr/bin/env bash
# Whole-proxy load test: the same tiny static FHIR upstream measured, in one run,
#   1. direct,
#   2. through nginx proxy_pass with upstream keepalive (the baseline),
#   3. through smartgate (auth.mode = "none": pass-through),
# and any extra smartgate configurations given as scenarios (see SCENARIOS below).
# Prints requests/s and p99 latency for each, and ratios to nginx and to direct.
#
#   benches/load.sh                 # 10 s per target, 64 connections
#   DURATION=5 CONNECTIONS=32 benches/load.sh
#
# Needs nginx and wrk (Debian: apt-get install -y nginx wrk) and a release build
# (the script runs `cargo build --release`). Everything listens on 127.0.0.1 only and
# every run is bounded by DURATION. Machines here are shared and noisy: read the ratios,
# not the absolute numbers, and compare only figures from the same run.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
PATH_UNDER_BASE=${PATH_UNDER_BASE:-/Patient/example}

for tool in nginx wrk; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install -y nginx wrk)" >&2; exit 2; }
done
cargo build --release --quiet
BIN=target/release/smartgate

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); NGX=$(free_port); SG=$(free_port); SGA=$(free_port)

# A FHIR Patient, as a small static upstream would return it.
PATIENT='{"resourceType":"Patient","id":"example","meta":{"versionId":"1","lastUpdated":"2024-01-01T00:00:00Z"},"active":true,"name":[{"use":"official","family":"Chalmers","given":["Peter","James"]}],"gender":"male","birthDate":"1974-12-25"}'

cat >"$WORK/nginx.conf" <<NGINX
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/body;
  proxy_temp_path $WORK/proxy;
  fastcgi_temp_path $WORK/fcgi;
  uwsgi_temp_path $WORK/uwsgi;
  scgi_temp_path $WORK/scgi;
  keepalive_requests 1000000;

  # The tiny static upstream.
  server {
    listen 127.0.0.1:$UP;
    location /fhir/ {
      default_type application/fhir+json;
      return 200 '$PATIENT';
    }
  }

  # The baseline proxy.
  upstream fhir { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX;
    location /r4/ {
      proxy_pass http://fhir/fhir/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$proxy_host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }
}
NGINX
nginx -c "$WORK/nginx.conf" -p "$WORK" -g 'daemon off;' &
PIDS+=($!)

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
[log]
level = "warn"
[reload]
watch = false
TOML
"$BIN" serve --config "$WORK/smartgate.toml" 2>"$WORK/smartgate.log" &
PIDS+=($!)

wait_up() {
  for _ in $(seq 100); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "not up: $1" >&2; tail -5 "$WORK"/*.log >&2; exit 1
}
wait_up "http://127.0.0.1:$UP/fhir$PATH_UNDER_BASE"
wait_up "http://127.0.0.1:$NGX/r4$PATH_UNDER_BASE"
wait_up "http://127.0.0.1:$SG/r4$PATH_UNDER_BASE"

# Same answer through both proxies (modulo headers).
diff <(curl -fsS "http://127.0.0.1:$NGX/r4$PATH_UNDER_BASE") \
     <(curl -fsS "http://127.0.0.1:$SG/r4$PATH_UNDER_BASE") >/dev/null \
  || { echo "proxies disagree on the body" >&2; exit 1; }

# wrk's summary → "rps p99_ms"
measure() {
  local out rps p99
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$1")
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' <<<"$out")
  if grep -q "Non-2xx" <<<"$out"; then echo "non-2xx answers from $1" >&2; echo "$out" >&2; exit 1; fi
  echo "$rps $p99"
}

# Warm-up, then the measured runs, back to back.
wrk -t1 -c8 -d2s "http://127.0.0.1:$SG/r4$PATH_UNDER_BASE" >/dev/null
wrk -t1 -c8 -d2s "http://127.0.0.1:$NGX/r4$PATH_UNDER_BASE" >/dev/null

read -r d_rps d_p99 < <(measure "http://127.0.0.1:$UP/fhir$PATH_UNDER_BASE")
read -r n_rps n_p99 < <(measure "http://127.0.0.1:$NGX/r4$PATH_UNDER_BASE")
read -r s_rps s_p99 < <(measure "http://127.0.0.1:$SG/r4$PATH_UNDER_BASE")

ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
printf '\n%-22s %12s %10s %12s %12s\n' target "req/s" "p99 ms" "vs nginx" "vs direct"
printf '%-22s %12.0f %10.2f %12s %12s\n' direct "$d_rps" "$d_p99" "$(ratio "$d_rps" "$n_rps")" 1.00
printf '%-22s %12.0f %10.2f %12s %12s\n' "nginx proxy_pass" "$n_rps" "$n_p99" 1.00 "$(ratio "$n_rps" "$d_rps")"
printf '%-22s %12.0f %10.2f %12s %12s\n' "smartgate pass-through" "$s_rps" "$s_p99" "$(ratio "$s_rps" "$n_rps")" "$(ratio "$s_rps" "$d_rps")"
echo
echo "p99 smartgate / nginx: $(ratio "$s_p99" "$n_p99")  (${DURATION}s per target, $CONNECTIONS connections, $THREADS wrk threads, $(nproc) cores)"
