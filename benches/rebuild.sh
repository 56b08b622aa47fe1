#!/usr/bin/env bash
# How long a replica that lost its disk takes to be rebuilt from its peers by
# anti-entropy: three release `ringkv server` processes on loopback (N=3, 1024
# partitions, one shard each), KEYS keys written at W=3, node 3 killed, its data
# directory emptied, node 3 restarted; timed until its status says every partition
# matches a peer's tree and it holds every key. Prints node 3's progress lines.
#
#   benches/rebuild.sh [keys]        (default 1000000)
#
# PUSH_RATE sets --anti-entropy-pushes-per-second (default 2000; 0: no limit).
# Optional second argument: seconds of foreground load (`ringkv bench`, YCSB A, W=2 R=2)
# run through node 1 while node 3 is rebuilt, to see p99 during the exchanges.
set -euo pipefail
cd "$(dirname "$0")/.."
keys=${1:-1000000}
load_seconds=${2:-0}
cargo build --release -q -p ringkv-tools
ringkv=./target/release/ringkv
work=$(mktemp -d "${PWD}/target/rebuild.XXXXXX")
declare -A pids
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# Node k: native 18500+10k, Redis 18400+10k (each shard takes the next port).
peers="1@127.0.0.1:18510,2@127.0.0.1:18520,3@127.0.0.1:18530"
start() {
  local id=$1
  mkdir -p "$work/node-$id"
  ${WRAP:-} $ringkv server --node-id "$id" --shards 1 --partitions "${PARTITIONS:-1024}" --replicas 3 \
    --listen "127.0.0.1:185${id}0" --resp "127.0.0.1:184${id}0" --peers "$peers" \
    --anti-entropy-pushes-per-second "${PUSH_RATE:-2000}" \
    --data-dir "$work/node-$id" >"$work/node-$id.out" 2>>"$work/node-$id.err" &
  pids[$id]=$!
  for _ in $(seq 300); do grep -q "server ready" "$work/node-$id.out" 2>/dev/null && return; sleep 0.1; done
  cat "$work/node-$id.err" >&2
  exit 1
}
for id in 1 2 3; do start "$id"; done
sleep 1
echo "$(date -u '+%F %H:%M') UTC, $(nproc) cores; writing $keys keys at W=3"
$ringkv bench --addr 127.0.0.1:18510 --workload w --keys "$keys" --seconds 1 --w 3 --connections 50 \
  >"$work/load.out" 2>"$work/load.err" || { tail -5 "$work/load.err" >&2; exit 1; }
tail -3 "$work/load.out"
if [ "$load_seconds" -gt 0 ]; then
  echo "== the same foreground load through node 1 with every replica in sync (baseline)"
  $ringkv bench --addr 127.0.0.1:18510 --workload a --keys "$keys" --seconds "$load_seconds" \
    --r 2 --w 2 --connections 20 --no-preload 2>/dev/null
fi
kill -9 "${pids[3]}"; wait "${pids[3]}" 2>/dev/null || true
rm -rf "$work/node-3"
: >"$work/node-3.err"
begin=$(date +%s.%N)
start 3
if [ "$load_seconds" -gt 0 ]; then
  echo "== foreground load through node 1 during the rebuild"
  $ringkv bench --addr 127.0.0.1:18510 --workload a --keys "$keys" --seconds "$load_seconds" \
    --r 2 --w 2 --connections 20 --no-preload 2>/dev/null &
  pids[bench]=$!
fi
while :; do
  status=$($ringkv status --addr 127.0.0.1:18510 -o json 2>/dev/null || true)
  line=$(python3 -c '
import json, sys
nodes = json.loads(sys.argv[1] or "{\"nodes\": []}")["nodes"]
three = [s for n in nodes if n["node_id"] == 3 for s in n["shards"]]
print(sum(s["keys"] for s in three), sum(s["partitions_in_sync"] for s in three), sum(s["partitions"] for s in three))
' "$status" 2>/dev/null || echo "0 0 0")
  read -r have in_sync partitions <<<"$line"
  if [ "$partitions" -gt 0 ] && [ "$in_sync" -eq "$partitions" ] && [ "$have" -ge "$keys" ]; then break; fi
  sleep 2
done
end=$(date +%s.%N)
if [ -n "${pids[bench]:-}" ]; then wait "${pids[bench]}" || true; unset 'pids[bench]'; fi
echo "== node 3's log"
grep -E "anti-entropy" "$work/node-3.err" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200
printf 'node 3 rebuilt %s keys from an empty disk in %.1f s (ready to in sync)\n' "$have" "$(python3 -c "print($end - $begin)")"
