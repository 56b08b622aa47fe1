#!/usr/bin/env bash
# Disk and index size under a delete-heavy load, before and after tombstone
# collection: three release `ringkv server` processes on loopback (N=3, 1024
# partitions, one shard each, hints kept 5 s, tombstones 10 s), redis-benchmark SETs
# over KEYS keys then DELs as many, and each node's status (live keys, tombstones,
# index bytes, record bytes on disk) after the writes, after the deletes, and once no
# node holds a tombstone (or 180 s passed).
#
#   benches/tombstones.sh [keys]        (default 100000; needs redis-benchmark)
set -euo pipefail
cd "$(dirname "$0")/.."
keys=${1:-100000}
command -v redis-benchmark >/dev/null || { echo "missing redis-benchmark (apt-get install redis-tools)" >&2; exit 1; }
cargo build --release -q -p ringkv-tools
ringkv=./target/release/ringkv
work=$(mktemp -d "${PWD}/target/tombstones.XXXXXX")
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# Node k: native 18600+10k, Redis 18700+10k.
peers="1@127.0.0.1:18610,2@127.0.0.1:18620,3@127.0.0.1:18630"
for id in 1 2 3; do
  mkdir -p "$work/node-$id"
  $ringkv server --node-id "$id" --shards 1 --partitions 1024 --replicas 3 \
    --listen "127.0.0.1:186${id}0" --resp "127.0.0.1:187${id}0" --peers "$peers" \
    --hint-age-max-s 5 --tombstone-grace-s 10 \
    --data-dir "$work/node-$id" >"$work/node-$id.out" 2>"$work/node-$id.err" &
  pids+=($!)
done
for id in 1 2 3; do
  for _ in $(seq 300); do grep -q "server ready" "$work/node-$id.out" 2>/dev/null && break; sleep 0.1; done
done
sleep 1
snapshot() {
  $ringkv status --addr 127.0.0.1:18610 -o json | python3 -c '
import json, sys
label = sys.argv[1]
for n in json.load(sys.stdin)["nodes"]:
    s = n["shards"]
    t = lambda f: sum(x[f] for x in s)
    row = (label, n["node_id"], t("keys"), t("tombstones"), t("index_bytes") / 1e6, t("disk_bytes") / 1e6, t("tombstones_collected"))
    print("%-22s node %d: keys %8d  tombstones %8d  index %7.2f MB  disk %7.2f MB  collected %8d" % row)
' "$1"
}
tombstones_left() {
  $ringkv status --addr 127.0.0.1:18610 -o json | python3 -c '
import json, sys
print(sum(x["tombstones"] for n in json.load(sys.stdin)["nodes"] for x in n["shards"]))'
}
echo "$(date -u '+%F %H:%M') UTC, $(nproc) cores; $keys keys"
redis-benchmark -p 18710 -t set -n $((keys * 3)) -r "$keys" -d 100 -c 50 -q | tr '\r' '\n' | tail -1
snapshot "after the writes"
redis-benchmark -p 18710 -n $((keys * 3)) -r "$keys" -c 50 -q DEL key:__rand_int__ | tr '\r' '\n' | tail -1
snapshot "after the deletes"
begin=$(date +%s)
while [ "$(tombstones_left)" -gt 0 ] && [ $(( $(date +%s) - begin )) -lt 180 ]; do sleep 2; done
snapshot "$(( $(date +%s) - begin )) s later"
