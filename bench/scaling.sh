#!/usr/bin/env bash
# Scaling curves, each point on a fresh server (fsync=batch, loopback):
#   (1) idle connections: `bimip bench idle --conns N` — logins/s, server CPU per login, RSS and
#       RSS per connection — then, with the N connections still open, the server's CPU over one
#       heartbeat interval (every connection is pinged once in it) from /proc/PID/stat;
#   (2) store throughput vs queue length: `bimip bench offline --messages M` — store and delivery
#       msg/s, RSS with the queue stored. These servers run with --max-queue-items 0 (the default
#       limit of 100k items per queue would drop most of a 1M queue) and a per-connection frame
#       rate limit out of the way (the default, 10k frames/s after a burst of 20k, closes the
#       sender's connection as a flood past ~20k messages);
#   (3) start-up with the largest queue of (2) stored: that server is stopped with SIGTERM and
#       started again on the same data dir; wall time until the "listening" line (printed before
#       the store is opened) and until /readyz answers 200 (after the store's recovery), RSS then.
#
# usage: bench/scaling.sh [--quick] [--no-build] [--out DIR] [--concurrency C]
#   --quick     tiny sizes (idle 500/1000, offline 1000/10000, start-up with 10000), to check
#               the pipeline (about a minute)
#   --no-build  use target/release/bimip as it is
#   --out DIR   where the JSON lines and the table go [bench/results]
#   --concurrency C  parallel logins of the idle runs [200, as bench/compare.sh]; a value above
#               the server's listen backlog overflows it at times (the table counts the SYNs the
#               kernel dropped: each costs that login a 1 s retransmission)
#
# Connection counts above the open-files hard limit minus 500 are capped to it (the soft limit is
# raised to the hard one); a capped point within 5 % of the previous one is skipped. Past 12k
# connections the bench spreads them over several 127.0.0.X source addresses by itself.
# Writes bench/results/bimip-scaling-<stamp>.jsonl and bench/results/scaling-<stamp>.md (also
# printed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
QUICK=0; BUILD=1; OUT=$ROOT/bench/results; CONCURRENCY=200
while [ $# -gt 0 ]; do
  case "$1" in
    --concurrency) CONCURRENCY=$2; shift ;;
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    --out) OUT=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
raise_nofile

if [ $QUICK = 1 ]; then
  CONNS=(500 1000); MESSAGES=(1000 10000); SETTLE=2; HEARTBEAT_MS=5000
else
  CONNS=(1000 5000 10000 19000 50000); MESSAGES=(10000 100000 1000000); SETTLE=5; HEARTBEAT_MS=20000
fi

if [ $BUILD = 1 ]; then
  cargo build --release -p bimip
fi
BIN=$ROOT/target/release/bimip
STAMP=$(date +%Y%m%dT%H%M%S)
RES=$OUT/bimip-scaling-$STAMP.jsonl
TABLE=$OUT/scaling-$STAMP.md
SUMMARY=$ROOT/bench/scaling_summary.py
CLK_TCK=$(getconf CLK_TCK) # /proc/PID/stat counts CPU time in these ticks per second
NOTES=()
note() { echo "note: $*" >&2; NOTES+=("$*"); }

new_credentials
trap stop_server EXIT

now_ns() { date +%s%N; }
secs_since() { awk -v a="$1" -v b="$(now_ns)" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }
lines_of() { if [ -f "$1" ]; then wc -l <"$1"; else echo 0; fi; }
# TcpExt ListenDrops of the whole machine: SYNs dropped because a listen queue was full (each
# costs the client a 1 s retransmission)
listen_drops() {
  awk '/^TcpExt:/ { if (!h) { for (i = 2; i <= NF; i++) k[i] = $i; h = 1 }
                    else { for (i = 2; i <= NF; i++) if (k[i] == "ListenDrops") print $i } }' /proc/net/netstat
}

# (1) Which connection counts fit under the open-files limit (the server and the bench each hold
# one descriptor per connection, plus store files, listeners, …).
HARD=$(ulimit -Hn)
POINTS=()
for N in "${CONNS[@]}"; do
  if [ "$HARD" != unlimited ] && [ "$N" -gt $((HARD - 500)) ]; then
    CAP=$((HARD - 500))
    PREV=0
    if [ ${#POINTS[@]} -gt 0 ]; then PREV=${POINTS[${#POINTS[@]}-1]}; fi
    if [ $((CAP * 100)) -le $((PREV * 105)) ]; then
      note "idle $N connections: over the open-files hard limit ($HARD) minus 500; skipped (the cap $CAP is within 5 % of the previous point $PREV)"
      continue
    fi
    note "idle $N connections: capped to $CAP (open-files hard limit $HARD minus 500)"
    N=$CAP
  fi
  POINTS+=("$N")
done

for N in "${POINTS[@]}"; do
  start_server --heartbeat-ms "$HEARTBEAT_MS"
  HB_S=$((HEARTBEAT_MS / 1000))
  BEFORE=$(lines_of "$RES"); DROPS0=$(listen_drops)
  echo "+ bimip bench idle --conns $N --settle $SETTLE --concurrency $CONCURRENCY --hold $((HB_S + 3)), then server CPU over ${HB_S} s idle" >&2
  timeout 900 "${BENCH[@]}" idle --conns "$N" --settle "$SETTLE" --concurrency "$CONCURRENCY" --hold $((HB_S + 3)) >/dev/null &
  BPID=$!
  # The bench appends its line after the settle time and then holds the connections open.
  while kill -0 "$BPID" 2>/dev/null && [ "$(lines_of "$RES")" -le "$BEFORE" ]; do sleep 0.1; done
  if kill -0 "$BPID" 2>/dev/null; then
    DROPS=$(($(listen_drops) - DROPS0))
    C0=$(proc_cpu_ticks "$PID"); T0=$(now_ns)
    sleep "$HB_S"
    C1=$(proc_cpu_ticks "$PID"); WINDOW=$(secs_since "$T0")
    python3 "$SUMMARY" --append "$RES" scenario=idle_heartbeat conns="$N" heartbeat_ms="$HEARTBEAT_MS" \
      window_s="$WINDOW" server_cpu_s="$(awk -v t=$((C1 - C0)) -v h="$CLK_TCK" 'BEGIN { printf "%.2f", t / h }')" \
      server_rss_kb="$(proc_rss_kb "$PID")" server_fds="$(find "/proc/$PID/fd" -mindepth 1 -maxdepth 1 | wc -l)" \
      listen_drops_during_logins="$DROPS" concurrency="$CONCURRENCY"
  fi
  wait "$BPID" || echo "  (failed: idle --conns $N)" >&2
  stop_server
done

# (2) offline queues of growing length, (3) the start-up with the last (largest) one stored.
OFFLINE_FLAGS=(--max-queue-items 0 --max-frames-per-second 100000000 --frames-burst 100000000)
LAST=${MESSAGES[${#MESSAGES[@]}-1]}
for M in "${MESSAGES[@]}"; do
  start_server "${OFFLINE_FLAGS[@]}"
  # --timeout is per phase (the delivery phase as a whole); the bench's own cap is 900 s
  OTIMEOUT=$((M >= 200000 ? 600 : 120))
  BENCH_TIMEOUT=960 run offline --messages "$M" --timeout "$OTIMEOUT"
  if [ "$M" = "$LAST" ]; then
    T0=$(now_ns)
    terminate_server 120
    STOP_S=$(secs_since "$T0")
    STOP_CLEAN=$((1 - KILLED))
    echo "+ restart on the stored queue of $M messages (stopped in $STOP_S s)" >&2
    : >"$DATA/server.out"
    T0=$(now_ns)
    SERVE_LOG=info launch_server "${OFFLINE_FLAGS[@]}" --log-format json
    # the "listening" line, polled every 10 ms (printed right after the bind, before the store opens)
    LISTEN_S=
    for _ in $(seq 30000); do
      if [ -s "$DATA/server.out" ]; then LISTEN_S=$(secs_since "$T0"); break; fi
      kill -0 "$PID" 2>/dev/null || break
      sleep 0.01
    done
    wait_listening 10 0.01
    # ready: /readyz answers once the store is recovered and the server serves (a connection made
    # earlier waits in the listen backlog)
    READY_S=
    for _ in $(seq 30000); do
      CODE=$(curl -s -o /dev/null -w '%{http_code}' --max-time 300 "http://$ADDR/readyz" || true)
      if [ "$CODE" = 200 ]; then READY_S=$(secs_since "$T0"); break; fi
      kill -0 "$PID" 2>/dev/null || break
      sleep 0.01
    done
    RSS=$(proc_rss_kb "$PID" || true)
    python3 "$SUMMARY" --append "$RES" scenario=startup messages="$M" stop_s="$STOP_S" \
      stop_clean="$STOP_CLEAN" listening_s="$LISTEN_S" ready_s="$READY_S" server_rss_kb="$RSS" \
      --log "$DATA/server.err"
  fi
  stop_server
done
trap - EXIT

{
  echo "<!-- bench/scaling.sh $STAMP; raw lines: ${RES#"$ROOT"/} -->"
  ARGS=("$RES" --note "$(nproc) cores, commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), fsync=batch, loopback, open files $(ulimit -n) (hard $HARD)$([ $QUICK = 1 ] && echo ', --quick sizes' || true)")
  for n in "${NOTES[@]}"; do ARGS+=(--note "$n"); done
  python3 "$SUMMARY" "${ARGS[@]}"
} >"$TABLE"
cat "$TABLE"
echo "table: $TABLE" >&2
