#!/usr/bin/env python3
"""Side-by-side markdown tables: bimip against peer servers, one table per scenario.

usage: summarize.py BIMIP.jsonl [PEER.jsonl ...] [--servers bimip,ejabberd,mosquitto]

Every file holds one JSON object per line, as written by `bimip bench` and by the peers' drivers
(an optional peer suite outside this repository): the keys are the same where the scenarios
overlap. Files that cannot be read are skipped. For each server
and scenario size the last line wins. Ratios are "peer / bimip" for costs (latency, CPU, memory,
time) and "bimip / peer" for rates (msg/s, logins/s), shown on the peer's row as "bimip advantage":
> 1× means bimip is better.
"""
import json
import sys


def load(paths):
    rows = []
    for p in paths:
        try:
            with open(p) as f:
                for line in f:
                    line = line.strip()
                    if line:
                        try:
                            rows.append(json.loads(line))
                        except ValueError:
                            pass
        except OSError as e:
            print("(skipping %s: %s)" % (p, e), file=sys.stderr)
    return rows


def g(r, path):
    v = r
    for k in path.split("."):
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return v


def f(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return ("%." + str(nd) + "f") % v
    return str(v)


def ratio(a, b, cost):
    """a = bimip, b = peer. cost: peer/bimip, else bimip/peer."""
    if a is None or b is None:
        return "-"
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return "-"
    if cost:
        if a <= 0 or b <= 0:
            return "-"
        return "%.1f×" % (b / a)
    if b <= 0:
        return "-"
    return "%.1f×" % (a / b)


# scenario -> (title, key fn, key columns, metrics [(label, path, digits, is_cost)], ratio metrics)
SCEN = [
    ("chat", "(a) 1:1 chat, N online pairs",
     lambda r: (r.get("pairs"), r.get("mode"), r.get("rate_target") or 0),
     ["pairs", "mode", "offered msg/s"],
     lambda k: [str(k[0]), k[1], f(k[2], 0) if k[2] else "max"],
     [("delivered msg/s", "throughput_msg_s", 0, False), ("p50 ms", "latency.p50_ms", 2, True),
      ("p99 ms", "latency.p99_ms", 2, True), ("server µs CPU/msg", "server_cpu_us_per_msg", 0, True)],
     ["latency.p99_ms", "server_cpu_us_per_msg"]),
    ("offline", "(b) offline queue: M messages to an offline user, then log in",
     lambda r: (r.get("messages"),), ["M"], lambda k: [str(k[0])],
     [("store msg/s", "store_msg_s", 0, False), ("first msg ms", "first_msg_after_presence_ms", 1, True),
      ("all M s", "all_after_presence_s", 3, True), ("delivery msg/s", "deliver_msg_s", 0, False),
      ("RSS MB", "server_rss_mb_with_queue", 1, True)],
     ["store_msg_s", "deliver_msg_s"]),
    ("idle", "(c) idle authenticated connections",
     lambda r: (r.get("conns"),), ["conns"], lambda k: [str(k[0])],
     [("alive", "alive", 0, False), ("logins/s", "logins_per_s", 0, False),
      ("RSS after MB", "rss_after_mb", 1, True), ("RSS/conn KB", "rss_per_conn_kb", 1, True)],
     ["logins_per_s", "rss_per_conn_kb"]),
    ("presence", "(d) presence change to K online watchers (10 iterations)",
     lambda r: (r.get("contacts"),), ["K"], lambda k: [str(k[0])],
     [("all received median ms", "all_received_ms.median", 2, True), ("max ms", "all_received_ms.max", 2, True),
      ("per-recipient p99 ms", "per_recipient_latency.p99_ms", 2, True),
      ("timeouts", "all_received_ms.timeouts", 0, True)],
     ["all_received_ms.median"]),
]


def main(argv):
    servers = None
    paths = []
    i = 0
    while i < len(argv):
        if argv[i] == "--servers":
            servers = argv[i + 1].split(",")
            i += 2
            continue
        paths.append(argv[i])
        i += 1
    rows = load(paths)
    if servers is None:
        servers = []
        for r in rows:
            s = r.get("server")
            if s and s not in servers:
                servers.append(s)
    base = servers[0] if servers else "bimip"
    for name, title, keyf, kcols, kfmt, metrics, ratios in SCEN:
        table = {}
        for r in rows:
            if r.get("scenario") != name or r.get("server") not in servers:
                continue
            table.setdefault(keyf(r), {})[r["server"]] = r
        if not table:
            continue
        cost_of = {p: c for (_, p, _, c) in metrics}
        label_of = {p: l for (l, p, _, _) in metrics}
        print("### %s\n" % title)
        head = list(kcols) + ["server"] + [m[0] for m in metrics]
        head += ["bimip advantage: %s" % label_of[p] for p in ratios]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))

        def sortkey(k):
            return tuple((0, x) if isinstance(x, (int, float)) else (1, str(x)) for x in k)

        for k in sorted(table, key=sortkey):
            by = table[k]
            b = by.get(base)
            for s in servers:
                r = by.get(s)
                if r is None:
                    continue
                row = kfmt(k) + [s]
                for (_, p, nd, _) in metrics:
                    row.append(f(g(r, p), nd))
                for p in ratios:
                    if s == base:
                        row.append("")
                    else:
                        row.append(ratio(g(b, p) if b else None, g(r, p), cost_of[p]))
                print("| " + " | ".join(row) + " |")
        print()
    mixed = [r for r in rows if r.get("scenario") == "mixed" and r.get("server") == base]
    if mixed:
        r = mixed[-1]
        print("### (e) mixed blend (%s only)\n" % base)
        print("| duration s | idle | pairs | msg/s | chat p50 ms | p99 ms | typing sent/recv | intents | reconnects | resumed | errors | server CPU s | RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        print("| %s | %s | %s | %s | %s | %s | %s/%s | %s | %s | %s | %s | %s | %s |" % (
            f(r.get("duration_s"), 0), r.get("idle"), r.get("pairs"), f(r.get("throughput_msg_s"), 0),
            f(g(r, "latency.p50_ms"), 2), f(g(r, "latency.p99_ms"), 2), r.get("typing_sent"), r.get("typing_received"),
            r.get("intents_sent"), r.get("reconnects"), r.get("resumed_messages"), r.get("errors"),
            f(r.get("server_cpu_s"), 2), f(r.get("rss_after_mb"), 1)))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
