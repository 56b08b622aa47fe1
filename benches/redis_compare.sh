#!/usr/bin/env bash
# ringkv next to redis-server, driven by the same redis-benchmark, in one run.
#
#   benches/redis_compare.sh [requests]        (default 200000 per test; -c 1 runs 1/20)
#
# Needs redis-server and redis-benchmark (Debian: apt-get install redis-server
# redis-tools); installs nothing itself. Builds ringkv in release mode. Prints one
# line per (server, test) with requests/s, latency percentiles in ms, and the server's
# CPU time per request (user + system, from /proc, over the test).
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-200000}
for tool in redis-server redis-benchmark redis-cli; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install redis-server redis-tools)" >&2; exit 1; }
done
cargo build --release -q -p ringkv-tools
work=$(mktemp -d "${PWD}/target/redis-compare.XXXXXX")
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# Each server's pid, by port, for its CPU time per request.
declare -A pid_of
./target/release/ringkv server --resp 127.0.0.1:17379 --listen 127.0.0.1:17400 --data-dir "$work/ringkv" >"$work/ringkv.log" 2>&1 &
pids+=($!); pid_of[17379]=$!
# One shard: on a machine whose cores the load generator shares, a second executor
# competes with it for a core (see docs/benchmarks.md).
./target/release/ringkv server --shards 1 --resp 127.0.0.1:17679 --listen 127.0.0.1:17700 --data-dir "$work/ringkv1" >"$work/ringkv1.log" 2>&1 &
pids+=($!); pid_of[17679]=$!
redis-server --port 17479 --dir "$work" --save '' --appendonly yes --appendfsync always \
  --appendfilename always.aof --daemonize no >"$work/redis-always.log" 2>&1 &
pids+=($!); pid_of[17479]=$!
redis-server --port 17579 --dir "$work" --save '' --appendonly no --daemonize no >"$work/redis-off.log" 2>&1 &
pids+=($!); pid_of[17579]=$!
for port in 17379 17679 17479 17579; do
  for _ in $(seq 100); do [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done
done
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system, in clock ticks
hz=$(getconf CLK_TCK)

run() { # name port clients pipeline
  local name=$1 port=$2 clients=$3 pipeline=$4 n=$requests test
  # One client waits out every fsync alone: fewer requests keep the run short.
  [ "$clients" = 1 ] && n=$((requests / 20))
  for test in set get; do
    local before after
    before=$(ticks "${pid_of[$port]}")
    redis-benchmark -p "$port" -t "$test" -d 100 -c "$clients" -P "$pipeline" -n "$n" -r 100000 --csv 2>/dev/null |
      tail -n +2 | tr -d '"' | while IFS=, read -r name_ rps avg min p50 p95 p99 max; do
        printf '%-28s %-4s c=%-3s P=%-3s %10.0f req/s  p50 %6s  p99 %6s  max %6s ms' \
          "$name" "$name_" "$clients" "$pipeline" "$rps" "$p50" "$p99" "$max"
      done
    after=$(ticks "${pid_of[$port]}")
    # Server CPU time (all its threads, kernel work for its syscalls included) per request.
    awk -v t=$((after - before)) -v hz="$hz" -v n="$n" 'BEGIN {printf "  cpu %5.1f us/req\n", t * 1e6 / hz / n}'
  done
}
echo "redis-benchmark -t set,get -d 100 -n $requests -r 100000, $(date -u +%F), $(nproc) cores shared by servers and load"
for shape in "50 1" "50 16" "1 1"; do
  set -- $shape
  run "ringkv (sync)" 17379 "$1" "$2"
  run "ringkv (sync, 1 shard)" 17679 "$1" "$2"
  run "redis appendfsync always" 17479 "$1" "$2"
  run "redis persistence off" 17579 "$1" "$2"
done
