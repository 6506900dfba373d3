//! `bimip bench`: every scenario runs at a tiny size against a real server and appends its JSON
//! line to the results file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{API_KEY, SECRET, Server};
use serde_json::Value;
use std::process::Command;

fn bench(server: &Server, results: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bimip"))
        .arg("bench")
        .args(args)
        .args(["--url", &server.url()])
        .args(["--secret", SECRET, "--api-key", API_KEY])
        .args(["--server-pid", &server.pid().to_string()])
        .args(["--results", results.to_str().unwrap()])
        .args(["--quiet", "--quiesce", "0", "--label", "smoke"])
        .output()
        .expect("run bimip bench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn every_scenario_runs_and_appends_a_json_line() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    let mut expected = 0;
    let runs: &[&[&str]] = &[
        &[
            "chat",
            "--pairs",
            "2",
            "--rate",
            "200",
            "--warmup",
            "0.3",
            "--duration",
            "1",
        ],
        &[
            "chat",
            "--pairs",
            "2",
            "--rate",
            "0",
            "--window",
            "2",
            "--warmup",
            "0.3",
            "--duration",
            "1",
        ],
        &["offline", "--messages", "50"],
        &["idle", "--conns", "20", "--settle", "0.3"],
        &[
            "mixed",
            "--duration",
            "2",
            "--idle",
            "5",
            "--pairs",
            "2",
            "--rate",
            "20",
            "--typing-rate",
            "2",
            "--churn-rate",
            "2",
            "--reconnect-users",
            "2",
            "--offline-rate",
            "10",
        ],
    ];
    for args in runs {
        let (ok, out) = bench(&server, &results, args);
        assert!(ok, "bench {args:?} failed:\n{out}");
        expected += 1;
        let all = lines(&results);
        assert_eq!(all.len(), expected, "{out}");
        let rec = all.last().unwrap();
        assert_eq!(rec["scenario"], args[0]);
        assert_eq!(rec["server"], "smoke");
    }
    let all = lines(&results);
    let chat = &all[0];
    assert_eq!(chat["mode"], "open");
    assert!(chat["received_measured"].as_u64().unwrap() > 0, "{chat}");
    assert_eq!(chat["undelivered_at_end"], 0, "{chat}");
    assert!(chat["latency"]["p99_ms"].as_f64().is_some(), "{chat}");
    assert!(chat["server_cpu_s"].as_f64().is_some(), "{chat}");
    assert_eq!(all[1]["mode"], "closed");
    assert!(all[1]["throughput_msg_s"].as_f64().unwrap() > 0.0);
    assert_eq!(all[2]["received"], 50, "{}", all[2]);
    assert_eq!(all[2]["acked"], 50, "{}", all[2]);
    assert_eq!(all[3]["alive"], 20, "{}", all[3]);
    assert!(all[4]["chat_received"].as_u64().unwrap() > 0, "{}", all[4]);

    // Presence: the server may not support intent changes yet (UNAVAILABLE); then the run still
    // reports a clear error and appends its line.
    let (ok, out) = bench(
        &server,
        &results,
        &["presence", "--contacts", "5", "--iterations", "2"],
    );
    let all = lines(&results);
    assert_eq!(all.len(), expected + 1, "{out}");
    let rec = all.last().unwrap();
    assert_eq!(rec["scenario"], "presence");
    if out.contains("UNAVAILABLE") {
        assert!(!ok);
        assert!(rec["error"].as_str().unwrap().contains("UNAVAILABLE"));
        eprintln!("presence: the server does not support intent changes yet; skipped");
    } else {
        assert!(ok, "{out}");
        assert_eq!(rec["all_received_ms"]["timeouts"], 0, "{rec}");
        assert_eq!(rec["per_recipient_latency"]["n"], 10, "{rec}");
    }
}
