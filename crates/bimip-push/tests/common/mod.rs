//! Helpers shared by the provider tests: a sample push, and a throwaway TLS CA.
#![allow(dead_code, clippy::unwrap_used)]

use std::{collections::BTreeMap, path::Path, process::Command};

use bimip_push::{Kind, Platform, PushMessage};

/// A chat push from alice to bob's device `token`.
pub fn push(platform: Platform, token: &str) -> PushMessage {
    PushMessage {
        id: "push-01JD5".into(),
        platform,
        token: token.into(),
        sandbox: false,
        user: "bob".into(),
        device: "phone".into(),
        kind: Kind::Chat,
        from: "alice".into(),
        message_id: "01JD5M".into(),
        offset: 1234,
        count: 2,
        unread: 3,
        title: "alice".into(),
        body: "New message".into(),
        data: BTreeMap::from([("room".to_owned(), "r1".to_owned())]),
        collapse_id: "c:alice".into(),
        high_priority: true,
        expires_at: 0,
    }
}

/// Runs the `openssl` command in `dir` (scripts/test installs it when missing).
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `ca.pem` (a throwaway CA) and `cert.pem` + `key.pem` (a leaf for 127.0.0.1 and
/// localhost signed by it) in `dir`. webpki refuses a self-signed certificate used as the
/// server's own, hence the CA.
pub fn make_test_ca(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ca: Vec<&str> = [
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=bimip push test CA",
        ],
    ]
    .concat();
    openssl(dir, &ca);
    let csr: Vec<&str> = [
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat();
    openssl(dir, &csr);
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
        ],
    );
}
