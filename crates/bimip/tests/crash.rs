//! `kill -9` at random points while clients send pipelined messages and a device acknowledges
//! them, with `--fsync always` and `--fsync batch`, and while compaction (retention and the queue
//! limit) runs constantly. After each crash `bimip check --repair` may only cut torn tails (so no
//! device cursor is ahead of the stored queue), and after the restart every message whose Ack a
//! client received is stored exactly once (unless compaction was allowed to drop it), with
//! monotonic offsets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bimip_proto::{
    Body, Codec,
    v1::{Partition, ReceiptKind},
};
use common::*;
use std::{
    collections::{BTreeMap, HashMap},
    process::Command,
    time::{Duration, Instant},
};

const SENDERS: usize = 3;

/// A small xorshift generator (seeded from the clock; the seed is printed for reruns).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("crash test seed: CRASH_SEED={seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One sender: pipelined sends (up to 32 in flight) until the connection dies; returns
/// (message id, offset) of every message the server acknowledged.
async fn sender(url: String, user: String, round: usize) -> Vec<(String, u64)> {
    let opts = bimip_client::ConnectOptions::new(url)
        .token(token(&user, Some("d")))
        .codec(Codec::Binary);
    let Ok((mut c, _)) = bimip_client::Client::connect(opts).await else {
        return Vec::new();
    };
    let mut acked = Vec::new();
    let mut pending = HashMap::new();
    let mut n = 0u64;
    'outer: loop {
        while pending.len() < 32 {
            let id = format!("{user}-r{round}-{n}");
            match c.send_message("sink", &id, id.clone().into_bytes()).await {
                Ok(r) => {
                    pending.insert(r, id);
                }
                Err(_) => break 'outer,
            }
            n += 1;
        }
        match c.recv_timeout(Duration::from_secs(5)).await {
            Ok(Some(f)) => {
                if let Some(Body::Ack(a)) = f.body
                    && let Some(id) = pending.remove(&f.r#ref)
                {
                    acked.push((id, a.offset));
                }
            }
            _ => break,
        }
    }
    acked
}

/// The sink's device: acknowledges (READ) the messages of `ack_from` as they arrive, until the
/// connection dies.
async fn acking_sink(url: String, ack_from: Vec<String>) -> u64 {
    let opts = bimip_client::ConnectOptions::new(url)
        .token(token("sink", Some("d")))
        .codec(Codec::Binary);
    let Ok((mut c, _)) = bimip_client::Client::connect(opts).await else {
        return 0;
    };
    let mut receipts = 0;
    while let Ok(Some(f)) = c.recv_timeout(Duration::from_secs(5)).await {
        if let Some(Body::Message(m)) = f.body
            && ack_from.contains(&m.from)
            && m.offset % 4 == 0
        {
            if c.receipt(&m.from, ReceiptKind::Read, m.offset, Partition::Chat)
                .await
                .is_err()
            {
                break;
            }
            receipts += 1;
        }
    }
    receipts
}

/// `bimip check --repair` on the crashed data dir: it may cut torn tails, nothing else may be
/// wrong (a cursor ahead of the queue, a bad line, non-monotonic offsets); a second check is
/// clean.
fn check_after_crash(dir: &std::path::Path) -> usize {
    let out = Command::new(env!("CARGO_BIN_EXE_bimip"))
        .args(["check", "--repair", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check --repair failed:\n{text}");
    let repaired: Vec<&str> = text.lines().filter(|l| l.ends_with("(repaired)")).collect();
    for l in &repaired {
        assert!(
            l.contains(": torn or corrupt last line"),
            "more than a torn tail: {l}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_bimip"))
        .args(["check", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check after repair:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    repaired.len()
}

/// Everything stored in the sink's queue, per sender: id → offset (checked unique and in order).
async fn stored(s: &Server) -> BTreeMap<String, BTreeMap<String, u64>> {
    let (mut v, _) = s.online("sink", "verify").await;
    let mut out = BTreeMap::new();
    let mut seen = HashMap::new();
    for i in 0..SENDERS {
        let from = format!("s{i}");
        let (msgs, _) = resume_all(&mut v, &from, 1, 1000).await;
        assert!(
            msgs.windows(2).all(|w| w[0].offset < w[1].offset),
            "monotonic offsets from {from}"
        );
        let mut mine = BTreeMap::new();
        for m in msgs {
            assert!(
                seen.insert(m.offset, m.id.clone()).is_none(),
                "offset {} stored twice",
                m.offset
            );
            assert!(
                mine.insert(m.id.clone(), m.offset).is_none(),
                "{} stored twice",
                m.id
            );
        }
        out.insert(from, mine);
    }
    out
}

/// How compaction may have thinned the sink's queue.
#[derive(Clone, Copy, PartialEq)]
enum Drops {
    /// Nothing may be missing.
    None,
    /// Retention may drop messages of `s0` (acknowledged by the sink), nothing else.
    Retention,
    /// The queue limit may drop the oldest messages: what is kept is a suffix.
    Limit,
}

/// Runs `rounds` crash rounds on one data dir; returns (acknowledged messages, torn tails cut).
async fn crash_rounds(
    flags: &[&str],
    rounds: usize,
    drops: Drops,
    rng: &mut Rng,
) -> (usize, usize) {
    let mut s = Server::start(flags);
    // Under the queue limit nobody acknowledges, so the limit drops strictly oldest first.
    let ack_from: Vec<String> = match drops {
        Drops::None => (0..SENDERS).map(|i| format!("s{i}")).collect(),
        Drops::Retention => vec!["s0".into()],
        Drops::Limit => Vec::new(),
    };
    // id → (sender, offset) of every message a client got an Ack for.
    let mut acked: HashMap<String, (String, u64)> = HashMap::new();
    let mut torn = 0;
    let mut max_offset = 0u64;
    let mut dropped = 0;
    for round in 0..rounds {
        let sink = tokio::spawn(acking_sink(s.url(), ack_from.clone()));
        let mut tasks = Vec::new();
        for i in 0..SENDERS {
            tasks.push(tokio::spawn(sender(s.url(), format!("s{i}"), round)));
        }
        let delay = 300 + rng.below(600);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        s.kill9();
        let mut round_acks = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            for (id, offset) in t.await.unwrap() {
                assert!(
                    offset > max_offset,
                    "offset {offset} after a restart is not above {max_offset}"
                );
                acked.insert(id, (format!("s{i}"), offset));
                round_acks += 1;
            }
        }
        let _receipts = sink.await.unwrap();
        assert!(round_acks > 10, "the stream was running: {round_acks} acks");
        torn += check_after_crash(&s.dir);
        s.start_again();
        // Start-up compacts queues found over the limit in the background: read until two
        // reads agree, so the check sees one state, not pages from before and after it.
        let mut now = stored(&s).await;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let again = stored(&s).await;
            if again == now {
                break;
            }
            now = again;
        }
        let all_offsets: Vec<u64> = now.values().flat_map(|m| m.values().copied()).collect();
        max_offset = max_offset.max(acked.values().map(|(_, o)| *o).max().unwrap_or(0));
        let min_kept = all_offsets.iter().copied().min().unwrap_or(u64::MAX);
        dropped = 0;
        for (id, (from, offset)) in &acked {
            let found = now[from].get(id);
            let may_miss = match drops {
                Drops::None => false,
                Drops::Retention => from == "s0",
                Drops::Limit => *offset < min_kept,
            };
            if let Some(o) = found {
                assert_eq!(o, offset, "{id} moved");
            } else {
                assert!(may_miss, "acknowledged {id} (offset {offset}) lost");
                dropped += 1;
            }
        }
        if drops == Drops::Limit {
            assert!(!all_offsets.is_empty(), "the newest messages are kept");
        }
    }
    if drops != Drops::None {
        assert!(dropped > 0, "compaction dropped something");
    }
    eprintln!("{flags:?}: {dropped} acknowledged messages dropped by compaction as allowed");
    // Offsets keep growing after the last restart, also past dropped items.
    let (mut c, _) = s.online("s0", "d").await;
    let a = send(&mut c, "sink", "after-the-crashes", "x").await;
    assert!(a.offset > max_offset, "{} <= {max_offset}", a.offset);
    drop(c);
    s.terminate();
    (acked.len(), torn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_no_acknowledged_message() {
    let started = Instant::now();
    let mut rng = Rng::new();
    let mut total = (0, 0);
    for mode in ["always", "batch"] {
        let (acked, torn) = crash_rounds(&["--fsync", mode], 5, Drops::None, &mut rng).await;
        eprintln!(
            "fsync={mode}: 5 kill -9 rounds, {acked} acknowledged, 0 lost, {torn} torn tails cut"
        );
        total.0 += acked;
        total.1 += torn;
    }
    eprintln!(
        "kill -9: 10 rounds, {} acknowledged messages, 0 lost ({:?})",
        total.0,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_constant_compaction_loses_nothing_it_may_not_drop() {
    let started = Instant::now();
    let mut rng = Rng::new();
    // Retention of 1 s: the sink's acknowledged messages from s0 are dropped while s1 and s2
    // (never acknowledged) must all survive.
    let (acked, torn) = crash_rounds(
        &["--fsync", "batch", "--retention", "1s"],
        4,
        Drops::Retention,
        &mut rng,
    )
    .await;
    eprintln!(
        "retention 1s: 4 kill -9 rounds, {acked} acknowledged, 0 lost, {torn} torn tails cut"
    );
    // A queue limit of 50: compaction after nearly every batch; the kept messages are always
    // the newest ones, without holes.
    let (acked, torn) = crash_rounds(
        &["--fsync", "batch", "--max-queue-items", "50"],
        3,
        Drops::Limit,
        &mut rng,
    )
    .await;
    eprintln!(
        "max-queue-items 50: 3 kill -9 rounds, {acked} acknowledged, 0 lost, {torn} torn tails cut ({:?})",
        started.elapsed()
    );
}
