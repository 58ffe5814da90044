#!/usr/bin/env bash
# HTTP load, in one go on this machine: a bare axum hello, the same with tower_governor, and
# the same with Tollgate's RateLimitLayer (memory store, three limits matching every
# request, never reached). Prints requests/s, p50/p99 and the ratios to record in
# docs/performance.md. Traffic goes to 127.0.0.1 only; each run is bounded in time.
#
#   scripts/bench-http.sh [SECONDS] [CONNECTIONS]
#   MODES="tollgate tollgate-export" scripts/bench-http.sh   # export on vs off
#     (BENCH_CLICKHOUSE_URL=http://127.0.0.1:8123 for a real ClickHouse; else a stand-in)
#   MODES="bare tollgate tollgate@/path/to/other/bench_app" scripts/bench-http.sh
#     # `MODE@BINARY` runs that mode of another build (the commit before, built in a
#     # worktree), interleaved with this one's: a side-by-side comparison in one run
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
connections=${2:-64}

source scripts/bench-common.sh
need_wrk
cargo build --release --example bench_app -q
bin=target/release/examples/bench_app
port=$((20000 + RANDOM % 20000))

# Rounds interleave the three apps, so that the machine's drifts hit all of them alike; the
# figure per app is its median round.
rounds=${ROUNDS:-3}
declare -A all
for round in $(seq "$rounds"); do
  for mode in ${MODES:-bare governor tollgate}; do
    run=$bin label=$mode
    case $mode in *@*) run=${mode#*@} label="${mode%%@*}@other" ;; esac
    "$run" "${mode%%@*}" "$port" & pid=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
    out=$(wrk -t2 -c"$connections" -d"${seconds}s" --latency "http://127.0.0.1:$port/api/v1/items/42")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    r=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    all[$label]="${all[$label]:-} $r"
    printf 'round %d  %-9s %12s req/s   p50 %-8s p99 %-8s non-2xx %s\n' "$round" "$label" "$r" "$p50" "$p99" "${non2xx:-0}"
  done
done
median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for mode in "${!all[@]}"; do printf 'median    %-16s %s req/s\n' "$mode" "$(median "${all[$mode]}")"; done
ratio() { [ -n "${all[$1]:-}" ] && [ -n "${all[$2]:-}" ] &&
  awk -v a="$(median "${all[$1]}")" -v b="$(median "${all[$2]}")" -v l="$3" 'BEGIN { printf "%s = %.2f\n", l, a / b }'; }
ratio tollgate bare "tollgate / bare     (target >= 0.90)" || true
ratio tollgate governor "tollgate / governor (target >= 1.00)" || true
ratio tollgate-export tollgate "export on / off     (target >= 0.95)" || true
ratio tollgate@other bare "other / bare        (the other build)" || true
ratio tollgate tollgate@other "tollgate / other    (this build against the other)" || true
ratio tollgate-export@other tollgate@other "other: export on / off" || true
