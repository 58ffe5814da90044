#!/usr/bin/env bash
# Envoy's ShouldRateLimit over gRPC against POST /v1/check, side by side on one
# `tollgate serve` (release build), with the memory store and with a local Redis: one
# descriptor `[remote_address]` / the same client address, one limit each, never reached.
# Both are driven by the same client (examples/rls_load.rs), so that both pay the same
# client cost. Prints requests/s, p50/p99 per round, the medians and the ratio to record in
# docs/performance.md. Traffic goes to 127.0.0.1 only; each run is bounded in time.
#
#   scripts/bench-grpc.sh [SECONDS] [CONNECTIONS]      STORES="memory redis" ROUNDS=3
#   LOADS="check grpc tonic grpc-mux" scripts/bench-grpc.sh
#     tonic: tonic's own client; grpc-mux: the same requests in flight on MUX_CONNECTIONS
#     (default 2) HTTP/2 connections, as Envoy multiplexes them
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
connections=${2:-64}
rounds=${ROUNDS:-3}
mux=${MUX_CONNECTIONS:-2}

cargo build --release --bin tollgate --example rls_load -q
bin=target/release/tollgate
load=target/release/examples/rls_load
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
cat >"$dir/bench.rl" <<'RL'
limit http_bench { key ip; rate 10_000_000/min; }
limit grpc_bench {
  match { domain "bench"; descriptor ["remote_address"]; }
  key ip;
  rate 10_000_000/min;
}
RL
# Three ports in a row from a random start (not `$(…)`: a subshell repeats $RANDOM).
base=$((20000 + RANDOM % 20000))
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done; echo "nothing on $1" >&2; cat "$dir"/serve-*.log >&2 2>/dev/null; exit 1; }

for store in ${STORES:-memory redis}; do
  env=(TOLLGATE_POLICIES="$dir" TOLLGATE_KEY_SECRET=0123456789abcdef0123456789abcdef RUST_LOG=warn)
  if [ "$store" = redis ]; then
    rport=$((base + 2))
    redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
    wait_port "$rport"
    env+=(TOLLGATE_REDIS_URL="redis://127.0.0.1:$rport")
  fi
  http=$base grpc=$((base + 1))
  env "${env[@]}" TOLLGATE_LISTEN="127.0.0.1:$http" TOLLGATE_GRPC_LISTEN="127.0.0.1:$grpc" \
    "$bin" serve >/dev/null 2>"$dir/serve-$store.log" & pids+=($!)
  wait_port "$http"; wait_port "$grpc"
  declare -A rps=()
  for round in $(seq "$rounds"); do
    for mode in ${LOADS:-check grpc}; do
      addr="127.0.0.1:$http"; [ "$mode" != check ] && addr="127.0.0.1:$grpc"
      case $mode in
        # As Envoy sends them: a few HTTP/2 connections (one per worker), many streams each.
        grpc-mux) out=$("$load" grpc "$addr" "$seconds" "$mux" $((connections / mux)) | sed 's/^grpc/grpc-mux/') ;;
        *) out=$("$load" "$mode" "$addr" "$seconds" "$connections") ;;
      esac
      printf 'round %d  %-6s %-5s %s\n' "$round" "$store" "$mode" "$out"
      rps[$mode]="${rps[$mode]:-} $(awk '{print $2}' <<<"$out")"
    done
  done
  median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  for mode in "${!rps[@]}"; do printf 'median %-6s %-5s %s req/s\n' "$store" "$mode" "$(median "${rps[$mode]}")"; done
  ratio() { [ -n "${rps[$1]:-}" ] && awk -v g="$(median "${rps[$1]}")" -v c="$(median "${rps[check]}")" -v s="$store" -v m="$1" \
    'BEGIN { printf "%-6s %-8s / check = %.2f (target >= 0.80)\n", s, m, g / c }'; }
  for mode in grpc grpc-mux tonic; do ratio "$mode" || true; done
  unset rps
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  base=$((base + 3))
done
