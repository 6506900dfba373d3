# shellcheck shell=bash
# Helpers shared by bench/compare.sh and bench/scaling.sh (sourced, not run). The caller sets
# ROOT (the repository), BIN (target/release/bimip) and RES (the JSON-lines results file).
#
#   raise_nofile           soft open-files limit up to the hard one (prints it on stderr)
#   new_credentials        generated BIMIP_JWT_SECRET and BIMIP_API_KEY, exported
#   start_server [FLAG..]  a fresh server on a new temporary data dir, with extra `serve` flags;
#                          sets PID, DATA, ADDR and BENCH (the bench command for this server)
#   launch_server [FLAG..] starts `bimip serve` on $DATA/data without waiting ($SERVE_LOG, default
#                          warn, is its --log); sets PID
#   wait_listening N S     waits (N polls, S seconds apart) for the "listening" line; sets ADDR
#   terminate_server [S]   SIGTERM, at most S seconds (15) for the exit, then SIGKILL (KILLED=1);
#                          keeps the data dir
#   stop_server            terminate_server, then removes the data dir
#   run SCENARIO [FLAG..]  one bench run, bounded by `timeout $BENCH_TIMEOUT` (660 s); its JSON
#                          line goes to $RES
#   proc_cpu_ticks PID     utime+stime of PID in clock ticks (getconf CLK_TCK per second)
#   proc_rss_kb PID        VmRSS of PID in KB

# shellcheck disable=SC2034  # KILLED and ADDR are for the callers
PID=; DATA=; ADDR=; KILLED=0
BENCH=()

raise_nofile() {
  ulimit -n "$(ulimit -Hn)" || true
  echo "open files limit: $(ulimit -n)" >&2
}

new_credentials() {
  BIMIP_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  BIMIP_API_KEY=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  export BIMIP_JWT_SECRET BIMIP_API_KEY
}

launch_server() {
  "$BIN" serve --listen 127.0.0.1:0 --data-dir "$DATA/data" --fsync batch --log "${SERVE_LOG:-warn}" "$@" \
    >"$DATA/server.out" 2>"$DATA/server.err" &
  PID=$!
}

wait_listening() {
  local tries=$1 pause=$2
  ADDR=
  for _ in $(seq "$tries"); do
    ADDR=$(sed -n 's/^bimip listening on http:\/\/\([^ ]*\) .*/\1/p' "$DATA/server.out" | head -1)
    [ -n "$ADDR" ] && break
    kill -0 "$PID" 2>/dev/null || { cat "$DATA/server.err" >&2; exit 1; }
    sleep "$pause"
  done
  [ -n "$ADDR" ] || { echo "the server did not report its address" >&2; exit 1; }
  BENCH=("$BIN" bench --url "ws://$ADDR/ws" --server-pid "$PID" --label bimip --results "$RES" --quiet)
}

terminate_server() {
  local limit=${1:-15}
  KILLED=0
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    for _ in $(seq $((limit * 100))); do kill -0 "$PID" 2>/dev/null || break; sleep 0.01; done
    if kill -0 "$PID" 2>/dev/null; then
      KILLED=1
      kill -KILL "$PID" 2>/dev/null || true
    fi
  fi
  PID=
}

stop_server() {
  terminate_server 15
  if [ -n "$DATA" ]; then rm -rf "$DATA"; fi
  DATA=
}

# A fresh server (new data dir) each time: fsync=batch, the generated secret and API key.
start_server() {
  DATA=$(mktemp -d /tmp/bimip-bench.XXXXXX)
  launch_server "$@"
  wait_listening 100 0.1
  echo "bimip serve pid $PID on $ADDR, data in $DATA, results in $RES" >&2
}

run() {
  echo "+ bimip bench $*" >&2
  timeout "${BENCH_TIMEOUT:-660}" "${BENCH[@]}" "$@" >/dev/null || echo "  (failed: $*)" >&2
}

proc_cpu_ticks() {
  local s f
  s=$(cat "/proc/$1/stat") || return 1
  # fields after "pid (comm) ": state is [0], utime (field 14) [11], stime (field 15) [12]
  read -r -a f <<<"${s##*) }"
  echo $((f[11] + f[12]))
}

proc_rss_kb() {
  awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}
