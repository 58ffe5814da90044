#!/usr/bin/env bash
# Redis-backed HTTP load, in one go on this machine against one local redis-server:
#   (a) standin: a minimal axum app doing one EVALSHA of a fixed-window script per request,
#   (b) tollgate-redis: Tollgate's RateLimitLayer on the Redis store, three limits matching
#       every request, never reached (exact, requests batched per call),
#   (c) tollgate-redis-exceeded: the same with a limit every request exceeds (the local deny
#       cache answers),
#   (b1) tollgate-redis-one: Tollgate with the stand-in's one fixed window per client, for a
#       like-for-like comparison,
#   (d) redis-benchmark running the stand-in's script directly: the ceiling,
#   and the bare axum hello (no limiter, no Redis): the ceiling of any HTTP figure here.
# Other modes (MODES=…): tollgate-redis-unbatched (one call per request), tollgate-redis-ten
# (ten limits), tollgate-redis-local (three local-first limits), tollgate-local-memory (the
# same policy on the memory store), tollgate (the memory store, three limits).
# Prints requests/s, p50/p99, EVALSHA calls per request, the mean batch size (requests per
# call), and Redis's own time per request (INFO commandstats before and after: every script
# call, syncs included, divided by the requests served) — what one Redis core can serve is
# 1 / that. Traffic goes to 127.0.0.1 only.
#
#   scripts/bench-redis.sh [SECONDS] [CONNECTIONS]
#   MODES="tollgate-redis-one tollgate-redis tollgate-redis-ten" scripts/bench-redis.sh   # 1, 3, 10 limits
#   CLIENTS=10000 scripts/bench-redis.sh   # requests spread over 10,000 clients (X-Client-Id)
#     (with MODES, the rounds' lines only: the ceiling and the summary need the default modes)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
connections=${2:-64}

for entry in wrk:wrk redis-server:redis-server redis-benchmark:redis-tools; do
  command -v "${entry%%:*}" >/dev/null && continue
  echo "installing ${entry#*:}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${entry#*:}"
done
cargo build --release --example bench_app -q
bin=target/release/examples/bench_app
port=$((20000 + RANDOM % 20000))
rport=$((port + 1))

dir=$(mktemp -d)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do redis-cli -p "$rport" PING >/dev/null 2>&1 && break; sleep 0.05; done
export BENCH_REDIS_URL="redis://127.0.0.1:$rport"
# With CLIENTS, the app believes X-Client-Id from 127.0.0.1 (as from a trusted proxy).
[ -z "${CLIENTS:-}" ] || export BENCH_TRUST_LOCAL=1

# EVALSHA calls so far (one per round trip) and the microseconds Redis spent in them.
evalsha() { redis-cli -p "$rport" INFO commandstats | awk -F'[=,:]' '/^cmdstat_evalsha:/ {print $3, $5}'; }

rounds=${ROUNDS:-3}
declare -A all
for round in $(seq "$rounds"); do
  for mode in ${MODES:-bare standin tollgate-redis tollgate-redis-exceeded tollgate-redis-one}; do
    redis-cli -p "$rport" FLUSHALL >/dev/null
    "$bin" "$mode" "$port" & pid=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
    read -r before before_us <<<"$(evalsha)"; before=${before:-0}; before_us=${before_us:-0}
    # CLIENTS=N: each request names one of N clients (X-Client-Id), so keys differ.
    out=$(wrk -t2 -c"$connections" -d"${seconds}s" --latency ${CLIENTS:+-s scripts/wrk-clients.lua} "http://127.0.0.1:$port/api/v1/items/42")
    read -r after after_us <<<"$(evalsha)"; after=${after:-0}; after_us=${after_us:-0}
    kill "$pid"; wait "$pid" 2>/dev/null || true
    r=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    trips=$(awk -v a="$after" -v b="$before" -v n="$total" 'BEGIN {printf "%.4f", (a - b) / n}')
    batch=$(awk -v a="$after" -v b="$before" -v n="$total" 'BEGIN {if (a > b) printf "%.1f", n / (a - b); else printf "-"}')
    # Redis's own time per request: what one Redis core can serve, whatever the app's speed.
    redis_us=$(awk -v n="$total" -v u="$after_us" -v v="$before_us" \
      'BEGIN {printf "%.2f", (u - v) / n}')
    all[$mode]="${all[$mode]:-} $r"
    printf 'round %d  %-24s %10s req/s   p50 %-8s p99 %-8s non-2xx %-6s calls/request %s  batch %s  Redis µs/request %s\n' \
      "$round" "$mode" "$r" "$p50" "$p99" "${non2xx:-0}" "$trips" "$batch" "$redis_us"
  done
done

# Chosen modes: their rounds are the figures.
[ -z "${MODES:-}" ] || exit 0

# (d) The ceiling: the stand-in's script straight from redis-benchmark, same concurrency.
sha=$(redis-cli -p "$rport" SCRIPT LOAD "local c = redis.call('INCR', KEYS[1])
if c == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return c")
ceiling=$(redis-benchmark -p "$rport" -c "$connections" -n $((seconds * 50000)) -q \
  EVALSHA "$sha" 1 standin:bench 1000 | awk '{for (i = 1; i <= NF; i++) if ($i == "requests") print $(i-1)}' | tail -1)
echo "redis-benchmark EVALSHA (the ceiling): $ceiling req/s"

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
a=$(median "${all[standin]}"); b=$(median "${all[tollgate-redis]}"); c=$(median "${all[tollgate-redis-exceeded]}")
o=$(median "${all[tollgate-redis-one]}"); z=$(median "${all[bare]}")
printf 'median    bare %s   standin %s   tollgate-redis %s   exceeded %s   one limit %s req/s\n' "$z" "$a" "$b" "$c" "$o"
awk -v a="$a" -v b="$b" -v c="$c" -v o="$o" -v z="$z" 'BEGIN {
  printf "(b) tollgate-redis / standin          = %.2f (target >= 1.0)\n", b / a
  printf "(c) tollgate-redis-exceeded / standin = %.2f (target >= 1.5)\n", c / a
  printf "(b1) tollgate-redis-one / standin     = %.2f (one limit each)\n", o / a
  printf "bare / standin                        = %.2f (no limiter at all)\n", z / a
}'
