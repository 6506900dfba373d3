#!/usr/bin/env bash
# Side-by-side benchmark: bimip's scenarios at the sizes used for the peer servers (listed in
# docs/BENCHMARKS.md), optionally the peers' own suites (ejabberd, mosquitto) in the same run, then
# one markdown table with ratios.
#
# usage: bench/compare.sh [--peers] [--quick] [--no-build] [--out DIR]
#   --peers     also run ejabberd and mosquitto (installed from Debian if missing) with the
#               peers' drivers from $BIMIP_PEERS_DIR, an optional peer suite kept outside this
#               repository; otherwise their figures come from $BIMIP_PEERS_DIR/results/*.jsonl if that
#               folder exists, and the table shows bimip alone if it does not
#   --quick     small sizes (a minute or so), to check the pipeline
#   --no-build  use target/release/bimip as it is
#   --out DIR   where the JSON lines and the table go [bench/results]
#
# Loopback only. Every scenario is bounded (`timeout`); the server is stopped at the end. The idle
# scenarios run first on a fresh server, the others on a second fresh server.
# shellcheck disable=SC2119  # start_server's arguments (extra serve flags) are optional
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PEERS_DIR=${BIMIP_PEERS_DIR:-$ROOT/../shared/peers}
RUN_PEERS=0; QUICK=0; BUILD=1; OUT=$ROOT/bench/results
while [ $# -gt 0 ]; do
  case "$1" in
    --peers) RUN_PEERS=1 ;;
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

if [ $BUILD = 1 ]; then
  cargo build --release -p bimip
fi
BIN=$ROOT/target/release/bimip
STAMP=$(date +%Y%m%dT%H%M%S)
RES=$OUT/bimip-$STAMP.jsonl

new_credentials
trap stop_server EXIT

# (c) idle connections first, on a fresh server, so RSS per connection is not blurred by what
# earlier scenarios left on the heap
start_server
if [ $QUICK = 1 ]; then
  run idle --conns 1000 --settle 2
else
  run idle --conns 1000 --settle 5
  run idle --conns 10000 --settle 10 --concurrency 200
fi
stop_server

start_server
if [ $QUICK = 1 ]; then
  run chat --pairs 100 --rate 1000 --duration 3 --warmup 1
  run chat --pairs 100 --rate 0 --window 10 --duration 3 --warmup 1
  run offline --messages 1000
  run presence --contacts 100 --iterations 10
else
  # (a) 1:1 chat: open loop at fixed total rates (latency), then closed loop (max throughput)
  for N in 100 1000; do
    for R in 1000 5000 10000; do
      run chat --pairs $N --rate $R --duration 10 --warmup 2
    done
    run chat --pairs $N --rate 0 --window "$([ $N = 100 ] && echo 10 || echo 2)" --duration 10 --warmup 2
  done
  # (b) offline queue then login
  for M in 1000 10000; do run offline --messages $M; done
  # (d) presence broadcast to K online contacts
  for K in 100 1000; do run presence --contacts $K --iterations 10; done
  # (e) the blend
  run mixed --duration 30
fi
stop_server
trap - EXIT

PEER_FILES=()
if [ $RUN_PEERS = 1 ]; then
  [ -d "$PEERS_DIR" ] || { echo "no $PEERS_DIR" >&2; exit 1; }
  if ! command -v ejabberdctl >/dev/null || ! command -v mosquitto >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ejabberd mosquitto mosquitto-clients
  fi
  python3 -c 'import uvloop' 2>/dev/null || pip install uvloop
  (
    cd "$PEERS_DIR"
    ejabberd/ctl.sh start
    timeout 300 python3 load/setup_users.py ejabberd --users 10000 --hubs 100,1000
    ejabberd/ctl.sh stop; ejabberd/ctl.sh start
    if [ $QUICK = 1 ]; then
      P=$(ejabberd/ctl.sh pid)
      X="timeout 660 python3 load/bench_xmpp.py --server-pid $P --label ejabberd --out $OUT/ejabberd-$STAMP.jsonl --uvloop"
      $X chat --pairs 100 --rate 1000 --duration 3 --warmup 1
      $X offline --messages 1000
      $X presence --contacts 100 --iterations 10
      $X idle --conns 1000 --settle 2
    else
      load/run_xmpp_suite.sh ejabberd "$(ejabberd/ctl.sh pid)" "$OUT/ejabberd-$STAMP.jsonl"
    fi
    ejabberd/ctl.sh stop
    mosquitto/ctl.sh start
    if [ $QUICK = 1 ]; then
      P=$(mosquitto/ctl.sh pid)
      timeout 660 python3 load/bench_mqtt.py --server-pid "$P" --label mosquitto --out "$OUT/mosquitto-$STAMP.jsonl" --uvloop chat --pairs 100 --rate 1000 --duration 3 --warmup 1
    else
      load/run_mqtt_suite.sh "$(mosquitto/ctl.sh pid)" "$OUT/mosquitto-$STAMP.jsonl"
    fi
    mosquitto/ctl.sh stop
  ) || echo "(the peers' run failed; see above)" >&2
  PEER_FILES=("$OUT/ejabberd-$STAMP.jsonl" "$OUT/mosquitto-$STAMP.jsonl")
  NOTE="peers measured in this run"
else
  PEER_FILES=("$PEERS_DIR/results/ejabberd.jsonl" "$PEERS_DIR/results/mosquitto.jsonl")
  NOTE="peers' figures from ${PEERS_DIR#"$ROOT"/}/results, measured earlier, not in this run"
fi

TABLE=$OUT/compare-$STAMP.md
{
  echo "<!-- bench/compare.sh $STAMP; bimip: ${RES#"$ROOT"/}; $NOTE -->"
  python3 "$ROOT/bench/summarize.py" "$RES" "${PEER_FILES[@]}" --servers bimip,ejabberd,mosquitto
} >"$TABLE"
cat "$TABLE"
echo "table: $TABLE" >&2
