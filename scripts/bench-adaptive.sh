#!/usr/bin/env bash
# An adaptive concurrency limit in front of an overloaded upstream, through the reverse proxy
# (tests/adaptive_proxy.rs, release build): the upstream takes 5 ms, plus 1 ms per request in
# flight above 20, and fails past 50; 200 clients. Each round measures, side by side in one
# process, the unloaded latency (one client), 200 clients without a limit and 200 with the
# default `adaptive gradient`, then the time the limit takes to come back after the upstream
# struggled for 2 s. Traffic goes to 127.0.0.1 only; each round is bounded in time.
#
#   scripts/bench-adaptive.sh [SECONDS] [ROUNDS]     ADAPTIVE_TUNING="tolerance 1.5;"
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
rounds=${2:-3}
for round in $(seq "$rounds"); do
  echo "## round $round"
  ADAPTIVE_SECONDS=$seconds ADAPTIVE_SCALE=1 \
    cargo test --release -q --test adaptive_proxy -- --nocapture 2>&1 |
    grep -E '^(upstream|unloaded|without|adaptive|struggling)'
done
