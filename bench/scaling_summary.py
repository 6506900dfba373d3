#!/usr/bin/env python3
"""Markdown tables of bench/scaling.sh's results, and the JSON lines that script writes itself.

usage: scaling_summary.py RESULTS.jsonl [...] [--note TEXT ...]
       scaling_summary.py --append RESULTS.jsonl KEY=VALUE ... [--log SERVER_STDERR]

Tables (for each size the last line wins):
  (1) idle connections vs N: `idle` lines of `bimip bench`, joined with the script's
      `idle_heartbeat` lines (server CPU over one heartbeat interval with the N connections open);
  (2) offline queue vs M: `offline` lines of `bimip bench`;
  (3) start-up with M messages stored: the script's `startup` lines.

--append writes one line {"server": "bimip", "time": …, KEY: VALUE, …}: integers and decimals
become numbers, an empty value null. With --log (a server's stderr in --log-format json) the
fields of its "file store recovered" and "store opened" lines are added as `recovered` and
`store_opened`.
"""
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import g, load  # noqa: E402  (the same JSON-lines reader as compare.sh's table)

STARTUP_TARGET_S = 2.0


def value(s):
    if s == "":
        return None
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def log_fields(path):
    """Fields of the store's start-up lines in a --log-format json stderr."""
    found = {}
    wanted = {"file store recovered": "recovered", "store opened": "store_opened"}
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                fields = ev.get("fields") or {}
                key = wanted.get(fields.get("message"))
                if key:
                    found[key] = {k: v for k, v in fields.items() if k != "message"}
    except OSError as e:
        print("(no log %s: %s)" % (path, e), file=sys.stderr)
    return found


def append(argv):
    path, rest = argv[0], argv[1:]
    rec = {"server": "bimip",
           "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")}
    i = 0
    while i < len(rest):
        if rest[i] == "--log":
            rec.update(log_fields(rest[i + 1]))
            i += 2
            continue
        k, sep, v = rest[i].partition("=")
        if not sep:
            sys.exit("expected KEY=VALUE, got %r" % rest[i])
        rec[k] = value(v)
        i += 1
    line = json.dumps(rec, sort_keys=True)
    with open(path, "a") as fh:
        fh.write(line + "\n")
    print(line)


def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def f(v, nd=1):
    v = num(v)
    if v is None:
        return "-"
    return ("%." + str(nd) + "f") % v


def div(a, b, scale=1.0):
    a, b = num(a), num(b)
    if a is None or b is None or b == 0:
        return None
    return a / b * scale


def last_by(rows, scenario, key):
    out = {}
    for r in rows:
        if r.get("scenario") == scenario and r.get("server", "bimip") == "bimip" and num(r.get(key)) is not None:
            out[r[key]] = r
    return out


def table(title, caption, head, body):
    print("### %s\n" % title)
    print(caption + "\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in body:
        print("| " + " | ".join(row) + " |")
    print()


def summarize(rows, notes):
    print("## Scaling curves\n")
    for n in notes:
        print("* " + n)
    if notes:
        print()

    idle = last_by(rows, "idle", "conns")
    hb = last_by(rows, "idle_heartbeat", "conns")
    body = []
    for n in sorted(set(idle) | set(hb)):
        r, h = idle.get(n, {}), hb.get(n, {})
        window, cpu = h.get("window_s"), h.get("server_cpu_s")
        hb_s = div(h.get("heartbeat_ms"), 1000)
        # CPU per connection over one heartbeat interval (the window is about one interval)
        per_conn = div(cpu, n, 1e6)
        if per_conn is not None and num(window) and hb_s:
            per_conn = per_conn * hb_s / window
        body.append([str(n), f(r.get("alive"), 0), f(r.get("logins_per_s"), 0),
                     f(r.get("login_server_cpu_us_per_login"), 1), f(r.get("rss_after_mb"), 1),
                     f(r.get("rss_per_conn_kb"), 1), f(hb_s, 0), f(div(cpu, window, 100), 2),
                     f(per_conn, 1), f(div(h.get("server_rss_kb"), 1024), 1), f(h.get("server_fds"), 0),
                     f(h.get("listen_drops_during_logins"), 0)])
    if body:
        table("(1) idle authenticated connections vs N (a fresh server each)",
              "`bimip bench idle --conns N`: logins with %s in parallel; RSS after the settle time; "
              "RSS/conn = (after − before) ÷ N. Then, with the N connections open and idle, the "
              "server's CPU (utime+stime) over one heartbeat interval, in which every connection "
              "is pinged once and answers. SYN drops: the machine's TcpExt ListenDrops during the "
              "logins (a full listen queue; each dropped SYN delays that login by a 1 s "
              "retransmission, so logins/s is then mostly that second)."
              % "/".join(sorted({str(r.get("concurrency")) for r in idle.values()}) or ["?"]),
              ["conns", "alive", "logins/s", "server µs CPU/login", "RSS after MB", "RSS/conn KB",
               "heartbeat s", "idle CPU % of a core", "idle µs CPU/conn per heartbeat",
               "RSS after idle MB", "server fds", "SYN drops"], body)

    off = last_by(rows, "offline", "messages")
    body = []
    for m in sorted(off):
        r = off[m]
        body.append([str(m), f(r.get("inflight"), 0), f(r.get("store_msg_s"), 0), f(r.get("store_s"), 2),
                     f(div(r.get("store_server_cpu_s"), r.get("acked"), 1e6), 1),
                     f(r.get("deliver_msg_s"), 0), f(r.get("all_after_presence_s"), 3),
                     f(r.get("first_msg_after_presence_ms"), 1), f(r.get("received"), 0),
                     f(r.get("server_rss_mb_with_queue"), 1),
                     f(div(r.get("server_rss_mb_with_queue"), m, 1048576), 0)])
    if body:
        table("(2) offline queue of M messages vs M (a fresh server each)",
              "`bimip bench offline --messages M` (servers with `--max-queue-items 0` and the "
              "per-connection frame rate limit raised): M messages to one offline user, pipelined; store "
              "msg/s = M ÷ (first send → last Ack); delivery msg/s = M ÷ (Welcome → last Batch) of "
              "the RESUME after login; RSS with the queue stored, and that RSS ÷ M (includes the "
              "server's base RSS, so meaningful for large M only).",
              ["M", "in flight", "store msg/s", "store s", "server µs CPU/msg stored",
               "delivery msg/s", "all M s", "first msg ms", "received", "RSS with queue MB",
               "RSS ÷ M, B"], body)

    st = last_by(rows, "startup", "messages")
    body = []
    for m in sorted(st):
        r = st[m]
        ready = num(r.get("ready_s"))
        met = "-" if ready is None else ("yes" if ready < STARTUP_TARGET_S else "no")
        stop = f(r.get("stop_s"), 2) + ("" if r.get("stop_clean", 1) else " (killed)")
        body.append([str(m), f(g(r, "store_opened.records") or g(r, "recovered.records"), 0),
                     f(g(r, "store_opened.users") or g(r, "recovered.users"), 0), stop,
                     f(r.get("listening_s"), 3), f(r.get("ready_s"), 3),
                     f(g(r, "store_opened.took_ms"), 0), f(div(r.get("server_rss_kb"), 1024), 1),
                     met])
    if body:
        table("(3) start-up with the largest queue of (2) stored",
              "The server of (2)'s last run is stopped with SIGTERM (time to exit), then started "
              "on the same data dir: wall time from the launch until the \"listening\" line "
              "(printed right after the bind, *before* the store is opened) and until `/readyz` "
              "answers 200 (the store recovered, the server serving); the server's own \"store "
              "opened\" time; RSS right after. Target: ready in < %g s." % STARTUP_TARGET_S,
              ["stored messages", "records recovered", "users", "SIGTERM → exit s",
               "start → listening line s", "start → ready s", "store open ms (server log)",
               "RSS after start MB", "ready < %g s" % STARTUP_TARGET_S], body)


def main(argv):
    if argv and argv[0] == "--append":
        if len(argv) < 2:
            sys.exit(__doc__)
        append(argv[1:])
        return
    notes, paths = [], []
    i = 0
    while i < len(argv):
        if argv[i] == "--note":
            notes.append(argv[i + 1])
            i += 2
            continue
        paths.append(argv[i])
        i += 1
    if not paths:
        sys.exit(__doc__)
    summarize(load(paths), notes)


if __name__ == "__main__":
    main(sys.argv[1:])
