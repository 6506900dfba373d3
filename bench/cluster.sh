#!/usr/bin/env bash
# Several nodes on one Redis, measured with `bimip bench chat` (docs/BENCHMARKS.md, "Several nodes
# on Redis"). One run, same machine:
#   1. one node, file store            (the baseline)
#   2. one node, --redis               (the store in Redis, nothing crosses)
#   3. two nodes, --redis              (senders on one node, recipients on the other: every message
#                                       crosses; node CPU = both nodes)
#   4. CPU-capped saturation: one node, then two nodes (users spread so half the messages cross),
#      each node limited to --cap of a core by a cgroup v1 CPU quota; Redis and the load generator
#      uncapped. Labelled a simulation: on 2 cores, two nodes, Redis and the load generator share
#      the machine.
# Each chat run reports msg/s, p50/p99, node CPU per message, Redis CPU per message and Redis
# commands per message.
#
# usage: bench/cluster.sh [--no-build] [--rates "1000 5000"] [--pairs N] [--cap 0.3] [--out DIR]
# Needs redis-server (Debian's package; run ./scripts/test once, or apt-get install redis-server)
# and root for the cgroup (step 4 is skipped without it).
# shellcheck disable=SC2119
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=1; RATES="1000 5000"; PAIRS=1000; CAP=0.3; OUT=$ROOT/bench/results; DURATION=10
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --rates) RATES=$2; shift ;;
    --pairs) PAIRS=$2; shift ;;
    --cap) CAP=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
raise_nofile
[ $BUILD = 1 ] && cargo build --release -p bimip
BIN=$ROOT/target/release/bimip
RES=$OUT/cluster-$(date -u +%Y%m%dT%H%M%S).jsonl
new_credentials
command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 1; }

RPID=; RDIR=; RPORT=; REDIS=
start_redis() {
  RDIR=$(mktemp -d /tmp/bimip-bench-redis.XXXXXX)
  RPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --bind 127.0.0.1 --port "$RPORT" --save '' --appendonly yes --appendfsync always \
    --dir "$RDIR" --daemonize no >"$RDIR/redis.log" 2>&1 &
  RPID=$!
  for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
  REDIS=redis://127.0.0.1:$RPORT
  echo "redis-server pid $RPID on $RPORT (appendfsync always)" >&2
}
stop_redis() {
  [ -n "$RPID" ] && kill "$RPID" 2>/dev/null && wait "$RPID" 2>/dev/null || true
  [ -n "$RDIR" ] && rm -rf "$RDIR"
  RPID=; RDIR=
}
CG=/sys/fs/cgroup/cpu
cap_pid() { # cap_pid NAME PID: PID gets $CAP of a core
  local g=$CG/bimip-bench-$1
  mkdir -p "$g"
  echo 100000 >"$g/cpu.cfs_period_us"
  local quota
  quota=$(python3 -c "print(round($CAP*100000))")
  echo "$quota" >"$g/cpu.cfs_quota_us"
  for t in /proc/"$2"/task/*; do echo "${t##*/}" >"$g/tasks"; done
}
uncap() { for g in "$CG"/bimip-bench-*; do [ -d "$g" ] && rmdir "$g" 2>/dev/null || true; done; }

N1=; N1ADDR=; N2=; N2ADDR=; N1DATA=; N2DATA=
start_nodes() { # start_nodes COUNT [serve flags...]
  local count=$1; shift
  start_server "$@" --node-id n1; N1=$PID; N1ADDR=$ADDR; N1DATA=$DATA
  if [ "$count" = 2 ]; then
    start_server "$@" --node-id n2; N2=$PID; N2ADDR=$ADDR; N2DATA=$DATA
  fi
  BENCH=("$BIN" bench --url "ws://$N1ADDR/ws" --server-pid "$N1" --results "$RES" --quiet)
}
stop_nodes() {
  for p in $N1 $N2; do kill -TERM "$p" 2>/dev/null || true; done
  for p in $N1 $N2; do while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; done
  rm -rf "$N1DATA" "$N2DATA"
  N1=; N2=; PID=
}
trap 'stop_nodes; stop_redis; uncap' EXIT

[ "${SKIP_UNCAPPED:-0}" = 1 ] && RATES=
for rate in $RATES; do
  start_nodes 1
  run --label file chat --pairs "$PAIRS" --rate "$rate" --duration "$DURATION"
  stop_nodes

  start_redis
  start_nodes 1 --redis "$REDIS"
  run --label redis-1node chat --pairs "$PAIRS" --rate "$rate" --duration "$DURATION" --redis "$REDIS"
  stop_nodes; stop_redis

  start_redis
  start_nodes 2 --redis "$REDIS"
  run --label redis-2nodes-cross chat --pairs "$PAIRS" --rate "$rate" --duration "$DURATION" \
    --redis "$REDIS" --recipients-url "ws://$N2ADDR/ws" --recipients-pid "$N2"
  stop_nodes; stop_redis
done

if [ -w "$CG" ]; then
  start_redis
  start_nodes 1 --redis "$REDIS"
  cap_pid n1 "$N1"
  run --label "capped-1node-$CAP" chat --pairs 200 --rate 0 --window 8 --duration "$DURATION" --redis "$REDIS"
  stop_nodes; stop_redis; uncap

  start_redis
  start_nodes 2 --redis "$REDIS"
  cap_pid n1 "$N1"; cap_pid n2 "$N2"
  run --label "capped-2nodes-$CAP" chat --pairs 200 --rate 0 --window 8 --duration "$DURATION" \
    --redis "$REDIS" --recipients-url "ws://$N2ADDR/ws" --recipients-pid "$N2" --spread
  stop_nodes; stop_redis; uncap
else
  echo "no write access to $CG: the CPU-capped runs are skipped" >&2
fi

python3 - "$RES" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| run | offered msg/s | delivered msg/s | p50 ms | p99 ms | node CPU µs/msg | Redis CPU µs/msg | Redis commands/msg |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    lat = r.get("latency") or {}
    redis = r.get("redis") or {}
    node = r.get("nodes_cpu_us_per_msg") or r.get("server_cpu_us_per_msg")
    print(f"| {r.get('server')} | {r.get('rate_target') or 'closed loop'} | {r.get('throughput_msg_s')} | "
          f"{lat.get('p50_ms')} | {lat.get('p99_ms')} | {node} | {redis.get('cpu_us_per_msg', '–')} | "
          f"{redis.get('commands_per_msg', '–')} |")
EOF
echo "results: $RES" >&2
