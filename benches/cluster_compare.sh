#!/usr/bin/env bash
# A 3-node ringkv cluster (N=3, R=2, W=2) next to a 3-member etcd cluster, both on
# loopback on this machine, driven in the same run.
#
#   benches/cluster_compare.sh [seconds]        (default 10 per ringkv run)
#
# Needs etcd (Debian: etcd-server), ab (apache2-utils) and redis-benchmark
# (redis-tools); installs nothing itself. ringkv is driven by `ringkv bench` (native
# protocol, 50 connections) and by redis-benchmark through RESP; etcd by ab over its
# HTTP/JSON gateway with keep-alive (50 connections; every put is a Raft write that
# etcd fsyncs before answering, as ringkv's W=2 puts are fsynced on two replicas).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
for tool in etcd ab redis-benchmark; do
  command -v "$tool" >/dev/null || {
    echo "missing $tool (apt-get install etcd-server apache2-utils redis-tools)" >&2
    exit 1
  }
done
cargo build --release -q -p ringkv-tools
ringkv=./target/release/ringkv
work=$(mktemp -d "${PWD}/target/cluster-compare.XXXXXX")
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

$ringkv cluster --dir "$work/ringkv" --base-port 17500 --resp-port 17379 >"$work/cluster.out" 2>"$work/cluster.err" &
pids+=($!)
initial="e1=http://127.0.0.1:12380,e2=http://127.0.0.1:22380,e3=http://127.0.0.1:32380"
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$work/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:${i}2379" --advertise-client-urls "http://127.0.0.1:${i}2379" \
    --listen-peer-urls "http://127.0.0.1:${i}2380" --initial-advertise-peer-urls "http://127.0.0.1:${i}2380" \
    --initial-cluster "$initial" --initial-cluster-state new >"$work/etcd-$i.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 300); do grep -q "cluster ready" "$work/cluster.out" 2>/dev/null && break; sleep 0.1; done
grep -q "cluster ready" "$work/cluster.out" || { cat "$work/cluster.err" >&2; exit 1; }
for _ in $(seq 300); do
  ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379 endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done

echo "$(date -u '+%F %H:%M') UTC, $(nproc) cores shared by 6 server processes and the load; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "== ringkv bench, 3-node ringkv, N=3 R=2 W=2, 50 connections, 100-byte values"
$ringkv bench --addr 127.0.0.1:17500 --workload w --connections 50 --seconds "$seconds" --keys 100000 --r 2 --w 2 2>/dev/null
$ringkv bench --addr 127.0.0.1:17500 --workload c --connections 50 --seconds "$seconds" --keys 100000 --r 2 --w 2 --no-preload 2>/dev/null
echo
echo "== redis-benchmark through RESP on node 1 (defaults: R=2 W=2), -c 50 -d 100"
redis-benchmark -p 17379 -t set,get -d 100 -c 50 -n 50000 -r 100000 --csv 2>/dev/null |
  tail -n +2 | tr -d '"' | while IFS=, read -r test rps avg min p50 p95 p99 max; do
    printf 'ringkv %-4s %10.0f req/s  p50 %6s  p99 %6s  max %6s ms\n' "$test" "$rps" "$p50" "$p99" "$max"
  done
echo
echo "== etcd 3-member cluster, ab -k -c 50 over the HTTP/JSON gateway, 100-byte values"
value=$(head -c 100 /dev/zero | tr '\0' 'x' | base64 -w0)
printf '{"key":"%s","value":"%s"}' "$(printf bench-key | base64)" "$value" >"$work/put.json"
printf '{"key":"%s"}' "$(printf bench-key | base64)" >"$work/range.json"
for op in put range; do
  ab -k -c 50 -n 20000 -p "$work/$op.json" -T application/json "http://127.0.0.1:12379/v3/kv/$op" 2>/dev/null |
    awk -v op="$op" '/^Requests per second/ {rps=$4} /^Failed requests/ {failed=$3}
      /^  50%/ {p50=$2} /^  99%/ {p99=$2} /^ 100%/ {max=$2}
      END {printf "etcd %-5s %10.0f req/s  p50 %4s  p99 %4s  max %5s ms  (failed %s)\n", op, rps, p50, p99, max, failed}'
done
