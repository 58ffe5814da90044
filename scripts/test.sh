#!/usr/bin/env bash
# Runs Tollgate's whole test suite from a fresh checkout.
#
# Installs what the tests need when it is missing (Debian packages, as root or with sudo),
# then runs every test: unit, integration, doc tests, and each benchmark once as a test.
# Tests that need a server start their own on a free port; in CI (CI=true) a missing server
# is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests need, as `command:package`: nginx for the forward-auth test
# (tests/nginx.rs), redis-server and redis-cli (a Cluster is created with `redis-cli --cluster`)
# for the store tests (tests/conformance.rs, tests/redis_store.rs, tests/serve_store.rs).
REQUIRED=("nginx:nginx" "redis-server:redis-server" "redis-cli:redis-tools"
  "clickhouse-server:clickhouse-server" "clickhouse-client:clickhouse-client")

missing=()
for entry in "${REQUIRED[@]}"; do
  command -v "${entry%%:*}" >/dev/null 2>&1 || missing+=("${entry#*:}")
done
# `python3 -m venv` (for the chdb-core wheel below) needs Debian's python3-venv.
python3 -c "import ensurepip" >/dev/null 2>&1 || missing+=("python3-venv")
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

# Current ClickHouse in process (the chdb-core wheel, about 17 s to install): tests/analytics.rs
# runs the schema and every query there too, not only on Debian's 18.16.
CHDB_VENV=target/chdb-venv
if ! "$CHDB_VENV/bin/python" -c "import chdb" >/dev/null 2>&1; then
  echo "installing chdb-core into $CHDB_VENV"
  mkdir -p target
  python3 -m venv "$CHDB_VENV"
  "$CHDB_VENV/bin/pip" install -q chdb-core
fi

# Every feature on (the `tonic` feature has its own test, tests/grpc.rs), so that the
# builds below share one set of compiled dependencies.
# Each benchmark once, as a test: their setup asserts what they measure.
cargo test --all-features --benches
cargo test --all-features --doc
# Every server a test starts carries SPAWNED_BY_TOLLGATE_TESTS in its environment (its children
# inherit it): whatever still carries it after the suite was left behind by a test.
leftovers() {
  grep -lsz '^SPAWNED_BY_TOLLGATE_TESTS=' /proc/[0-9]*/environ 2>/dev/null |
    sed -e 's|^/proc/||' -e 's|/environ$||' | grep -vx "$$" || true
}
check_leftovers() {
  local left
  left=$(leftovers)
  if [ -n "$left" ]; then
    echo "error: the tests left these processes running:" >&2
    ps -o pid,pgid,args -p "$(echo "$left" | paste -sd,)" >&2 || true
    kill -9 $left 2>/dev/null || true
    return 1
  fi
}

# The main suite last, so that its summary closes the output.
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-features --no-fail-fast || status=$?
else
  cargo test --all-features --lib --bins --tests --no-fail-fast || status=$?
fi
check_leftovers || status=1
exit "$status"
