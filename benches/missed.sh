#!/usr/bin/env bash
# How long a replica that missed MINUTES of writes takes to converge by anti-entropy
# alone, with no read: three release `ringkv server` processes on loopback (N=3, 1,024
# partitions, one shard each), node 3 killed, redis-benchmark SETs through node 1
# (CLIENTS connections, 1M keys) for MINUTES, node 3 restarted; timed until its status says every partition matches a peer's tree and it
# holds as many keys as node 1.
#
#   benches/missed.sh [minutes] [clients]     (default 10 minutes, 20 clients; needs
#                                             redis-benchmark)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
clients=${2:-20}
cargo build --release -q -p ringkv-tools
ringkv=./target/release/ringkv
work=$(mktemp -d "${PWD}/target/missed.XXXXXX")
declare -A pids
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# Node k: native 18800+10k, Redis 18900+10k.
peers="1@127.0.0.1:18810,2@127.0.0.1:18820,3@127.0.0.1:18830"
start() {
  local id=$1
  mkdir -p "$work/node-$id"
  $ringkv server --node-id "$id" --shards 1 --partitions 1024 --replicas 3 \
    --listen "127.0.0.1:188${id}0" --resp "127.0.0.1:189${id}0" --peers "$peers" \
    --data-dir "$work/node-$id" >"$work/node-$id.out" 2>>"$work/node-$id.err" &
  pids[$id]=$!
  for _ in $(seq 300); do grep -q "server ready" "$work/node-$id.out" 2>/dev/null && return; sleep 0.1; done
  cat "$work/node-$id.err" >&2
  exit 1
}
for id in 1 2 3; do start "$id"; done
sleep 1
kill -9 "${pids[3]}"; wait "${pids[3]}" 2>/dev/null || true
: >"$work/node-3.out"
echo "$(date -u '+%F %H:%M') UTC, $(nproc) cores; node 3 down, SETs through node 1 for $minutes min"
# redis-benchmark through node 1 (`ringkv bench` will not start while a node is down:
# it connects to every shard first). SETs of 100-byte values over 1M keys, as fast as
# the two live nodes take them, for MINUTES.
timeout $((minutes * 60)) redis-benchmark -p 18910 -t set -n 100000000 -r 1000000 -d 100 \
  -c "$clients" -q 2>/dev/null | tr '\r' '\n' | grep -v '^$' | tail -1 || true
begin=$(date +%s.%N)
start 3
while :; do
  line=$($ringkv status --addr 127.0.0.1:18810 -o json 2>/dev/null | python3 -c '
import json, sys
nodes = {n["node_id"]: n["shards"] for n in json.load(sys.stdin)["nodes"]}
t = lambda i, f: sum(s[f] for s in nodes.get(i, []))
print(t(1, "keys"), t(3, "keys"), t(3, "partitions_in_sync"), t(3, "partitions"))
' 2>/dev/null || echo "0 0 0 0")
  read -r one three in_sync partitions <<<"$line"
  if [ "$partitions" -gt 0 ] && [ "$in_sync" -eq "$partitions" ] && [ "$three" -ge "$one" ]; then break; fi
  sleep 2
done
end=$(date +%s.%N)
sed 's/\x1b\[[0-9;]*m//g' "$work/node-3.err" | grep -E "anti-entropy" | cut -c1-200 | tail -4
printf 'node 3 caught up on %s keys (node 1 holds %s) %.1f s after its restart, with no read\n' "$three" "$one" "$(python3 -c "print($end - $begin)")"
