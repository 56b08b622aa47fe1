#!/usr/bin/env bash
# Foreground latency while the cluster grows and shrinks: three release `ringkv server`
# processes on loopback (N=3, one shard each), KEYS keys written at W=3, then the same
# open-loop load (`ringkv bench`, YCSB A, R=2 W=2, through node 1) three times: with
# the ring stable (baseline), while node 4 joins (`--join`), and while node 2 leaves
# (`ringkv admin leave`). Prints each run's percentiles and how long each change took.
#
#   benches/membership.sh [keys] [seconds per run]     (defaults 200000, 20)
#
# RATE sets the load's requests per second (default 2000); TRANSFER sets
# --transfer-keys-per-second (default: the server's, 20000); PARTITIONS (default 256);
# CONNECTIONS sets the load's connections (default 20); SERVER_ARGS adds flags to every server (e.g. "--anti-entropy-interval-ms 0").
# Each run also prints the CPU seconds each server process used during it.
set -euo pipefail
cd "$(dirname "$0")/.."
keys=${1:-200000}
seconds=${2:-20}
rate=${RATE:-2000}
cargo build --release -q -p ringkv-tools
ringkv=./target/release/ringkv
work=$(mktemp -d "${PWD}/target/membership.XXXXXX")
declare -A pids
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# Node k: native 18700+10k, Redis 18600+10k (each shard takes the next port).
peers="1@127.0.0.1:18710,2@127.0.0.1:18720,3@127.0.0.1:18730"
start() {
  local id=$1
  shift
  mkdir -p "$work/node-$id"
  $ringkv server --node-id "$id" --shards 1 --partitions "${PARTITIONS:-256}" --replicas 3 \
    --listen "127.0.0.1:187${id}0" --resp "127.0.0.1:186${id}0" \
    ${TRANSFER:+--transfer-keys-per-second "$TRANSFER"} ${SERVER_ARGS:-} \
    --data-dir "$work/node-$id" "$@" >"$work/node-$id.out" 2>>"$work/node-$id.err" &
  pids[$id]=$!
  for _ in $(seq 600); do grep -q "server ready" "$work/node-$id.out" 2>/dev/null && return; sleep 0.1; done
  cat "$work/node-$id.err" >&2
  exit 1
}
# Seconds until every node of "$1" (space-separated ids) holds a stable ring of
# exactly those members.
wait_stable() {
  local want=$1
  while :; do
    local json
    json=$($ringkv status --addr 127.0.0.1:18710 -o json 2>/dev/null || true)
    if python3 -c '
import json, sys
want = sorted(int(i) for i in sys.argv[2].split())
nodes = {n["node_id"]: n for n in json.loads(sys.argv[1] or "{\"nodes\": []}")["nodes"]}
ok = all(i in nodes and nodes[i]["ring"]["change"] is None and sorted(nodes[i]["ring"]["members"]) == want for i in want)
sys.exit(0 if ok else 1)
' "$json" "$want" 2>/dev/null; then return; fi
    sleep 0.5
  done
}
# CPU seconds (user + system) each running server has used so far, "id=secs ...".
cpu() {
  local id out=""
  for id in 1 2 3 4; do
    [ -n "${pids[$id]:-}" ] && [ -r "/proc/${pids[$id]}/stat" ] || continue
    out+="$id=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/${pids[$id]}/stat") "
  done
  echo "$out"
}
# The CPU seconds each server used between two `cpu` samples.
cpu_used() {
  python3 -c '
import sys
a = dict(kv.split("=") for kv in sys.argv[1].split())
b = dict(kv.split("=") for kv in sys.argv[2].split())
print("CPU seconds used meanwhile: " + ", ".join(f"node {k} {float(b[k]) - float(a.get(k, 0)):.1f}" for k in sorted(b)))
' "$1" "$2"
}
load() {
  $ringkv bench --addr 127.0.0.1:18710 --workload a --keys "$keys" --seconds "$seconds" \
    --rate "$rate" --r 2 --w 2 --connections "${CONNECTIONS:-20}" --no-preload 2>/dev/null
}
for id in 1 2 3; do start "$id" --peers "$peers"; done
sleep 1
echo "$(date -u '+%F %H:%M') UTC, $(nproc) cores; writing $keys keys at W=3"
$ringkv bench --addr 127.0.0.1:18710 --workload w --keys "$keys" --seconds 1 --w 3 --connections 50 \
  >"$work/preload.out" 2>"$work/preload.err" || { tail -5 "$work/preload.err" >&2; exit 1; }
tail -2 "$work/preload.out"

echo "== baseline: $rate requests/s for ${seconds} s, ring stable (nodes 1-3)"
before=$(cpu)
load
cpu_used "$before" "$(cpu)"

# Runs the load while the command after the first two arguments changes the ring;
# prints the load's figures, the CPU each server used, and how long the change took
# until every node of "$2" held a stable ring of exactly those ("$1" names it).
during_change() {
  local what=$1 members=$2 before begin end
  shift 2
  before=$(cpu)
  load >"$work/change.load" &
  pids[load]=$!
  sleep 1
  begin=$(date +%s.%N)
  "$@"
  wait_stable "$members"
  end=$(date +%s.%N)
  wait "${pids[load]}"
  unset 'pids[load]'
  cat "$work/change.load"
  cpu_used "$before" "$(cpu)"
  printf '%s in %.1f s (to a stable ring everywhere)\n' "$what" "$(python3 -c "print($end - $begin)")"
}
leave_two() { $ringkv admin leave --addr 127.0.0.1:18720 >/dev/null; }

echo "== the same load while node 4 joins through node 1"
during_change "node 4 joined" "1 2 3 4" start 4 --join 127.0.0.1:18710
echo "== the same load while node 2 leaves"
during_change "node 2 left" "1 3 4" leave_two
$ringkv status --addr 127.0.0.1:18710 | grep -E "^node|transfers" || true
