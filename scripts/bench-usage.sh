#!/usr/bin/env bash
# The proxy streaming LLM-style event streams (examples/sse_upstream.rs: 8 content chunks,
# then the usage, then [DONE]) with a usage limit (`cost response json("usage.total_tokens");
# reserve 100;`) against the same proxy with a request limit on the same route and key
# (`plain`) and with no limit (`none`), on the memory store and on a local Redis. Prints
# requests/s and p50/p99 per round, the medians, the ratios, and on Redis the batch-script
# calls and requests per HTTP request (a settlement is one more request of the batch script,
# queued with the admissions). Traffic goes to 127.0.0.1 only; each run is bounded in time.
#
#   scripts/bench-usage.sh [SECONDS] [CONNECTIONS]      STORES="memory redis" ROUNDS=3
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
connections=${2:-64}
rounds=${ROUNDS:-3}

source scripts/bench-common.sh
need_wrk
cargo build --release --bin tollgate --example sse_upstream -q
bin=target/release/tollgate
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
mkdir -p "$dir/none" "$dir/plain" "$dir/usage"
echo '# no limit' >"$dir/none/none.rl"
cat >"$dir/plain/plain.rl" <<'RL'
limit calls { match { route GET "/v1/chat/completions"; } key ip; algorithm fixed_window; rate 1_000_000_000/min; }
RL
cat >"$dir/usage/usage.rl" <<'RL'
limit tokens {
  match { route GET "/v1/chat/completions"; }
  key ip;
  algorithm fixed_window;
  rate 1_000_000_000/min;
  cost response json("usage.total_tokens") max 100_000;
  reserve 100;
}
RL
base=$((20000 + RANDOM % 20000))
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done; echo "nothing on $1" >&2; exit 1; }
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }

upstream=$((base + 9))
target/release/examples/sse_upstream "$upstream" 8 & pids+=($!)
wait_port "$upstream"

for store in ${STORES:-memory redis}; do
  env=(TOLLGATE_KEY_SECRET=0123456789abcdef0123456789abcdef RUST_LOG=warn TOLLGATE_METRICS_ON_MAIN=true
    TOLLGATE_UPSTREAM="http://127.0.0.1:$upstream")
  if [ "$store" = redis ]; then
    rport=$((base + 8))
    redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
    wait_port "$rport"
    env+=(TOLLGATE_REDIS_URL="redis://127.0.0.1:$rport")
  fi
  declare -A rps=() cpu=()
  for round in $(seq "$rounds"); do
    for mode in ${MODES:-none plain usage}; do
      port=$((base + 1))
      env "${env[@]}" TOLLGATE_POLICIES="$dir/$mode" TOLLGATE_LISTEN="127.0.0.1:$port" \
        "$bin" serve >/dev/null 2>"$dir/serve.log" & pid=$!
      wait_port "$port"
      out=$(wrk -t2 -c"$connections" -d"${seconds}s" --latency "http://127.0.0.1:$port/v1/chat/completions")
      r=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
      p50=$(awk '$1=="50%" {print $2}' <<<"$out")
      p99=$(awk '$1=="99%" {print $2}' <<<"$out")
      requests=$(awk '/requests in/ {print $1}' <<<"$out")
      # The proxy's own CPU time per request (user + system, from /proc): steadier than
      # requests/s on a machine that client, proxy and upstream share.
      ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
      extra=$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" -v n="$requests" \
        'BEGIN { if (n > 0) printf "  cpu %.1f us/request", t / hz * 1e6 / n }')
      if [ "$store" = redis ]; then
        calls=$(metric "$port" tollgate_redis_calls_total)
        batched=$(metric "$port" tollgate_redis_batched_requests_total)
        extra+=$(awk -v c="$calls" -v b="$batched" -v n="$requests" \
          'BEGIN { if (n > 0) printf ", script calls/request %.3f, script requests/request %.3f", c / n, b / n }')
      fi
      kill "$pid"; wait "$pid" 2>/dev/null || true
      printf 'round %d  %-6s %-5s %10s req/s  p50 %-8s p99 %-8s%s\n' "$round" "$store" "$mode" "$r" "$p50" "$p99" "$extra"
      rps[$mode]="${rps[$mode]:-} $r"
      cpu[$mode]="${cpu[$mode]:-} $(awk '{for (i = 1; i <= NF; i++) if ($i == "cpu") print $(i + 1)}' <<<"$extra")"
    done
  done
  median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  for mode in "${!rps[@]}"; do
    printf 'median %-6s %-5s %s req/s, cpu %s us/request\n' "$store" "$mode" "$(median "${rps[$mode]}")" "$(median "${cpu[$mode]}")"
  done
  for other in plain none; do
    [ -n "${rps[usage]:-}" ] && [ -n "${rps[$other]:-}" ] &&
      awk -v u="$(median "${rps[usage]}")" -v o="$(median "${rps[$other]}")" -v s="$store" -v m="$other" \
        'BEGIN { printf "%-6s usage / %-5s = %.2f (target >= 0.90)\n", s, m, u / o }'
  done
  [ -n "${cpu[usage]:-}" ] && [ -n "${cpu[plain]:-}" ] &&
    awk -v u="$(median "${cpu[usage]}")" -v o="$(median "${cpu[plain]}")" -v s="$store" \
      'BEGIN { printf "%-6s cpu per request: usage / plain = %.2f (throughput at equal load: %.2f)\n", s, u / o, o / u }'
  unset rps cpu
  base=$((base + 2))
done
