//! `bimip client`: connects as a user and sends/receives frames, interactively or from a script.
//!
//! Commands come from `-c` (in order, then exit after `--linger-ms`) or from stdin, one per line.
//! Every incoming frame is printed as one readable line (or its canonical JSON with `--raw`).

use anyhow::{Context, anyhow, bail};
use base64::Engine as _;
use bimip_client::{
    Client, ClientError, ClientReader, ClientWriter, ConnectOptions, token::mint_hs256,
};
use bimip_proto::v1::{self, Frame};
use bimip_proto::{Body, Codec};
use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

use crate::inspect::format_ts_ms;

#[derive(clap::Args)]
pub struct ClientArgs {
    /// WebSocket URL of the server.
    #[arg(long, env = "BIMIP_URL", default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// JWT to connect with.
    #[arg(long, env = "BIMIP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Connect as this user with a token minted from --secret (24h).
    #[arg(long)]
    pub user: Option<String>,
    /// HS256 secret used with --user.
    #[arg(long, env = "BIMIP_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Device id (put in the minted token, and sent as ?device=).
    #[arg(long)]
    pub device: Option<String>,
    /// Use the JSON subprotocol (bimip.v1.json) instead of binary.
    #[arg(long)]
    pub json: bool,
    /// Print each incoming frame as its canonical JSON instead of a readable line.
    #[arg(long)]
    pub raw: bool,
    /// Run this command (repeatable, in order), then exit after --linger-ms.
    #[arg(short = 'c', long = "command")]
    pub commands: Vec<String>,
    /// After the last command (or stdin EOF), wait this long for answers before closing.
    #[arg(long, default_value_t = 500)]
    pub linger_ms: u64,
}

const HELP: &str = "\
commands:
  send [--id ID] <to> <text…>        send a chat message
  resume <peer> [from_offset] [limit] fetch a batch of the conversation with peer
  read <peer> [up_to]                READ receipt (default: highest offset seen from peer)
  delivered <peer> [up_to]           DELIVERED receipt
  ack-notifications <up_to>          acknowledge notifications up to an offset
  ack-receipts <up_to>               acknowledge queued receipts up to an offset
  status online|away|busy|dnd [text…]
  typing <peer> | recording <peer>
  subscribe <users…> | unsubscribe <users…>
  invisible on|off
  push-token fcm|apns|webhook <token> [sandbox]   register this device's push token
  push-token remove                  remove it
  ping
  raw <json>                         send a Frame given in the proto3 JSON mapping
  sleep <ms>
  help | quit";

/// Highest chat offset seen from each peer, for `read`/`delivered` without an offset.
type Seen = Arc<Mutex<HashMap<String, u64>>>;

fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{text}");
    let _ = stdout.flush();
}

fn err_line(text: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{text}");
    let _ = stderr.flush();
}

pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let token = match (&args.user, &args.token) {
        (Some(user), _) if args.secret.as_deref().is_some_and(|s| !s.is_empty()) => {
            let secret = args.secret.as_deref().unwrap_or_default();
            mint_hs256(
                secret.as_bytes(),
                user,
                args.device.as_deref(),
                Duration::from_secs(24 * 3600),
            )?
        }
        (_, Some(t)) => t.clone(),
        (Some(_), None) => bail!("--user needs --secret (or BIMIP_JWT_SECRET) to mint a token"),
        (None, None) => {
            bail!("no credentials: pass --token (or BIMIP_TOKEN), or --user with --secret")
        }
    };
    let opts = ConnectOptions {
        url: args.url.clone(),
        token: Some(token),
        token_in_query: false,
        device: args.device.clone(),
        codec: if args.json {
            Codec::Json
        } else {
            Codec::Binary
        },
        subprotocol: None,
    };
    let (client, welcome) = match Client::connect(opts).await {
        Ok(x) => x,
        Err(ClientError::Http { status, body }) => {
            err_line(&format!("connection refused: HTTP {status}"));
            err_line(&body);
            std::process::exit(1);
        }
        Err(e) => {
            err_line(&format!("cannot connect to {}: {e}", args.url));
            std::process::exit(1);
        }
    };
    let me = welcome.user.clone();
    let welcome_frame = Frame::with(0, Body::Welcome(welcome));
    out(&render(&welcome_frame, args.raw));

    let (mut writer, reader) = client.split();
    let seen: Seen = Arc::default();
    let closing = Arc::new(AtomicBool::new(false));
    let mut reader_task = tokio::spawn(read_loop(
        reader,
        args.raw,
        me,
        seen.clone(),
        closing.clone(),
    ));

    let linger = Duration::from_millis(args.linger_ms);
    let input = run_input(&mut writer, &args.commands, &seen);
    let finished = tokio::select! {
        code = &mut reader_task => Some(code.unwrap_or(1)),
        quit = input => {
            let quit = quit.unwrap_or_else(|e| {
                err_line(&format!("error: {e}"));
                false
            });
            if quit {
                None
            } else {
                tokio::select! {
                    code = &mut reader_task => Some(code.unwrap_or(1)),
                    _ = tokio::time::sleep(linger) => None,
                }
            }
        }
    };
    let code = match finished {
        Some(code) => code,
        None => {
            // Close cleanly and let the reader print the server's close reply.
            closing.store(true, Ordering::SeqCst);
            let _ = writer.close_frame().await;
            match tokio::time::timeout(Duration::from_secs(2), &mut reader_task).await {
                Ok(Ok(code)) => code,
                Ok(Err(_)) => 1,
                Err(_) => {
                    reader_task.abort();
                    0
                }
            }
        }
    };
    // Exit directly: a pending blocking read of stdin would keep the runtime from shutting down.
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

/// Prints incoming frames until the server closes; returns the exit code.
async fn read_loop(
    mut reader: ClientReader,
    raw: bool,
    me: String,
    seen: Seen,
    closing: Arc<AtomicBool>,
) -> i32 {
    loop {
        match reader.recv().await {
            Ok(Some(frame)) => {
                note_offsets(&frame, &me, &seen);
                out(&render(&frame, raw));
            }
            Ok(None) => {
                return match reader.close_info() {
                    Some(c) => {
                        out(&format!("closed code={} reason={:?}", c.code, c.reason));
                        i32::from(!matches!(c.code, 1000 | 1001))
                    }
                    // We closed and the server hung up without a close frame of its own.
                    None if closing.load(Ordering::SeqCst) => {
                        out("closed code=1000 reason=\"closed by client\"");
                        0
                    }
                    None => {
                        out("closed code=none reason=\"connection dropped\"");
                        1
                    }
                };
            }
            Err(ClientError::Decode(e)) => err_line(&format!("undecodable frame: {e}")),
            Err(_) if closing.load(Ordering::SeqCst) => {
                out("closed code=1000 reason=\"closed by client\"");
                return 0;
            }
            Err(e) => {
                err_line(&format!("connection error: {e}"));
                out("closed code=none reason=\"connection error\"");
                return 1;
            }
        }
    }
}

fn note_offsets(frame: &Frame, me: &str, seen: &Seen) {
    let note = |from: &str, offset: u64| {
        if from.is_empty() || from == me || offset == 0 {
            return;
        }
        if let Ok(mut s) = seen.lock() {
            let e = s.entry(from.to_string()).or_insert(0);
            *e = (*e).max(offset);
        }
    };
    let chat = |p: i32| p == v1::Partition::Chat as i32;
    match &frame.body {
        Some(Body::Message(m)) if chat(m.partition) => note(&m.from, m.offset),
        Some(Body::Batch(b)) if chat(b.partition) => {
            for m in &b.messages {
                note(&m.from, m.offset);
            }
        }
        Some(Body::Summary(s)) => {
            for snd in &s.senders {
                note(&snd.from, snd.last_offset);
            }
        }
        _ => {}
    }
}

/// Runs the commands (from `-c`, else stdin). Returns true when the user asked to quit.
async fn run_input(
    writer: &mut ClientWriter,
    commands: &[String],
    seen: &Seen,
) -> anyhow::Result<bool> {
    if !commands.is_empty() {
        for c in commands {
            if run_line(writer, c, seen).await? {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        if run_line(writer, &line, seen).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// One command line; errors in the command are reported and skipped, connection errors end it.
async fn run_line(writer: &mut ClientWriter, line: &str, seen: &Seen) -> anyhow::Result<bool> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(false);
    }
    match command(line, seen) {
        Ok(Cmd::Quit) => Ok(true),
        Ok(Cmd::Help) => {
            out(HELP);
            Ok(false)
        }
        Ok(Cmd::Sleep(d)) => {
            tokio::time::sleep(d).await;
            Ok(false)
        }
        Ok(Cmd::Send(body)) => {
            writer.send(body).await?;
            Ok(false)
        }
        Ok(Cmd::Frame(f)) => {
            writer.send_frame(f).await?;
            Ok(false)
        }
        Err(e) => {
            err_line(&format!("error: {e}"));
            Ok(false)
        }
    }
}

enum Cmd {
    Send(Body),
    Frame(Frame),
    Sleep(Duration),
    Help,
    Quit,
}

/// Splits off the first whitespace-separated word.
fn word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    Some((&s[..end], s[end..].trim_start()))
}

fn need<'a>(s: &'a str, what: &str) -> anyhow::Result<(&'a str, &'a str)> {
    word(s).ok_or_else(|| anyhow!("missing {what}"))
}

fn num<T: std::str::FromStr>(s: &str, what: &str) -> anyhow::Result<T> {
    s.parse()
        .map_err(|_| anyhow!("{what} must be a number, got {s:?}"))
}

fn no_more(rest: &str) -> anyhow::Result<()> {
    if rest.is_empty() {
        Ok(())
    } else {
        bail!("unexpected arguments: {rest}")
    }
}

static MESSAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

fn new_message_id() -> String {
    let n = MESSAGE_COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
    format!("cli-{}-{n}", bimip_proto::now_ms())
}

fn command(line: &str, seen: &Seen) -> anyhow::Result<Cmd> {
    let (cmd, rest) = need(line, "command")?;
    let awareness = |a: v1::Awareness| Ok(Cmd::Send(Body::Awareness(a)));
    match cmd {
        "help" | "?" => Ok(Cmd::Help),
        "quit" | "exit" => Ok(Cmd::Quit),
        "ping" => {
            no_more(rest)?;
            Ok(Cmd::Send(Body::Ping(v1::Ping {
                timestamp: bimip_proto::now_ms(),
            })))
        }
        "sleep" => {
            let (ms, rest) = need(rest, "milliseconds")?;
            no_more(rest)?;
            Ok(Cmd::Sleep(Duration::from_millis(num(ms, "milliseconds")?)))
        }
        "send" => {
            let (first, rest) = need(rest, "recipient")?;
            let (id, to, text) = if first == "--id" {
                let (id, rest) = need(rest, "message id")?;
                let (to, text) = need(rest, "recipient")?;
                (id.to_string(), to, text)
            } else {
                (new_message_id(), first, rest)
            };
            Ok(Cmd::Send(Body::Message(v1::Message {
                id,
                to: to.to_string(),
                partition: v1::Partition::Chat as i32,
                payload: text.as_bytes().to_vec().into(),
                ..Default::default()
            })))
        }
        "resume" => {
            let (peer, rest) = need(rest, "peer")?;
            let (from_offset, rest) = match word(rest) {
                Some((w, r)) => (num(w, "from_offset")?, r),
                None => (0, rest),
            };
            let (limit, rest) = match word(rest) {
                Some((w, r)) => (num(w, "limit")?, r),
                None => (0, rest),
            };
            no_more(rest)?;
            awareness(v1::Awareness {
                to: peer.to_string(),
                status: v1::Status::Resume as i32,
                from_offset,
                limit,
                ..Default::default()
            })
        }
        "read" | "delivered" => {
            let kind = if cmd == "read" {
                v1::ReceiptKind::Read
            } else {
                v1::ReceiptKind::Delivered
            };
            let (peer, rest) = need(rest, "peer")?;
            let up_to = match word(rest) {
                Some((w, r)) => {
                    no_more(r)?;
                    num(w, "up_to")?
                }
                None => seen
                    .lock()
                    .ok()
                    .and_then(|s| s.get(peer).copied())
                    .ok_or_else(|| {
                        anyhow!(
                            "no message from {peer} seen yet: give the offset (`{cmd} {peer} N`)"
                        )
                    })?,
            };
            Ok(Cmd::Send(Body::Receipt(v1::Receipt {
                to: peer.to_string(),
                kind: kind as i32,
                up_to_offset: up_to,
                partition: v1::Partition::Chat as i32,
                ..Default::default()
            })))
        }
        "ack-notifications" | "ack-receipts" => {
            let partition = if cmd == "ack-notifications" {
                v1::Partition::Notification
            } else {
                v1::Partition::Receipt
            };
            let (up_to, rest) = need(rest, "up_to offset")?;
            no_more(rest)?;
            Ok(Cmd::Send(Body::Receipt(v1::Receipt {
                kind: v1::ReceiptKind::Delivered as i32,
                up_to_offset: num(up_to, "up_to")?,
                partition: partition as i32,
                ..Default::default()
            })))
        }
        "status" => {
            let (s, details) = need(rest, "status (online|away|busy|dnd)")?;
            let status = match s.to_ascii_lowercase().as_str() {
                "online" => v1::Status::Online,
                "away" => v1::Status::Away,
                "busy" => v1::Status::Busy,
                "dnd" => v1::Status::Dnd,
                other => bail!("unknown status {other:?} (online|away|busy|dnd)"),
            };
            awareness(v1::Awareness {
                status: status as i32,
                details: details.to_string(),
                ..Default::default()
            })
        }
        "typing" | "recording" => {
            let (peer, rest) = need(rest, "peer")?;
            no_more(rest)?;
            let status = if cmd == "typing" {
                v1::Status::Typing
            } else {
                v1::Status::Recording
            };
            awareness(v1::Awareness {
                to: peer.to_string(),
                status: status as i32,
                ..Default::default()
            })
        }
        "subscribe" | "unsubscribe" => {
            let users: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
            if users.is_empty() {
                bail!("missing users");
            }
            Ok(Cmd::Send(Body::Subscribe(v1::Subscribe {
                users,
                unsubscribe: cmd == "unsubscribe",
            })))
        }
        "invisible" => {
            let (v, rest) = need(rest, "on|off")?;
            no_more(rest)?;
            let invisible = match v {
                "on" | "true" | "yes" => true,
                "off" | "false" | "no" => false,
                other => bail!("invisible takes on|off, got {other:?}"),
            };
            awareness(v1::Awareness {
                status: v1::Status::Online as i32,
                invisible,
                ..Default::default()
            })
        }
        "push-token" => {
            let (first, rest) = need(rest, "fcm|apns|webhook <token>, or remove")?;
            if first == "remove" {
                no_more(rest)?;
                return Ok(Cmd::Send(Body::PushToken(v1::PushToken {
                    remove: true,
                    ..Default::default()
                })));
            }
            let platform = match first {
                "fcm" => v1::Platform::Fcm,
                "apns" => v1::Platform::Apns,
                "webhook" => v1::Platform::Webhook,
                other => bail!("unknown push platform {other:?} (fcm|apns|webhook)"),
            };
            let (token, rest) = need(rest, "token")?;
            let sandbox = match word(rest) {
                None => false,
                Some(("sandbox", r)) => {
                    no_more(r)?;
                    true
                }
                Some((other, _)) => {
                    bail!("unexpected {other:?} (only `sandbox` may follow the token)")
                }
            };
            Ok(Cmd::Send(Body::PushToken(v1::PushToken {
                platform: platform as i32,
                token: token.to_string(),
                sandbox,
                ..Default::default()
            })))
        }
        "raw" => {
            if rest.is_empty() {
                bail!("missing JSON frame");
            }
            let frame = Codec::Json
                .decode_text(rest)
                .map_err(|e| anyhow!("not a frame: {e}"))?;
            Ok(Cmd::Frame(frame))
        }
        other => bail!("unknown command {other:?} (try `help`)"),
    }
}

// ---- rendering -------------------------------------------------------------------------------

fn render(frame: &Frame, raw: bool) -> String {
    if raw {
        return serde_json::to_string(frame).unwrap_or_else(|e| format!("<unprintable: {e}>"));
    }
    describe(frame)
}

fn status_name(v: i32) -> String {
    v1::Status::try_from(v)
        .map(|s| s.as_str_name().trim_start_matches("STATUS_").to_string())
        .unwrap_or_else(|_| v.to_string())
}

fn partition_name(v: i32) -> String {
    v1::Partition::try_from(v)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("PARTITION_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| v.to_string())
}

fn receipt_kind_name(v: i32) -> String {
    v1::ReceiptKind::try_from(v)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("RECEIPT_KIND_")
                .to_string()
        })
        .unwrap_or_else(|_| v.to_string())
}

fn error_code_name(v: i32) -> String {
    v1::ErrorCode::try_from(v)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ERROR_CODE_")
                .to_string()
        })
        .unwrap_or_else(|_| v.to_string())
}

/// Payload as quoted UTF-8 text when it is valid, else `base64:…`.
pub(crate) fn payload_text(p: &[u8]) -> String {
    match std::str::from_utf8(p) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(p)
        ),
    }
}

/// A notification as `POST /v1/notifications` stores it: title, body, data, priority.
fn describe_notification(m: &v1::Message) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Content {
        title: String,
        #[serde(default)]
        body: String,
        #[serde(default)]
        data: std::collections::BTreeMap<String, String>,
        #[serde(default)]
        priority: String,
    }
    let c: Content = serde_json::from_slice(&m.payload).ok()?;
    let mut s = format!(
        "notification #{} {}→{} id={} {:?}",
        m.offset, m.from, m.to, m.id, c.title
    );
    if !c.body.is_empty() {
        s.push_str(&format!(" {:?}", c.body));
    }
    if c.priority == "high" {
        s.push_str(" priority=high");
    }
    for (k, v) in &c.data {
        s.push_str(&format!(" {k}={v:?}"));
    }
    if m.acknowledged {
        s.push_str(" acknowledged");
    }
    Some(s)
}

fn describe_message(m: &v1::Message) -> String {
    if m.partition == v1::Partition::Notification as i32
        && let Some(s) = describe_notification(m)
    {
        return s;
    }
    let mut s = format!("message #{} {}→{} id={}", m.offset, m.from, m.to, m.id);
    if m.partition != v1::Partition::Chat as i32 {
        s.push_str(&format!(" partition={}", partition_name(m.partition)));
    }
    if !m.device.is_empty() {
        s.push_str(&format!(" device={}", m.device));
    }
    if m.acknowledged {
        s.push_str(" acknowledged");
    }
    s.push(' ');
    s.push_str(&payload_text(&m.payload));
    s
}

fn describe_receipt(r: &v1::Receipt) -> String {
    let mut s = format!(
        "receipt {} {}→{} up_to={} ids=[{}]",
        receipt_kind_name(r.kind),
        r.from,
        r.to,
        r.up_to_offset,
        r.message_ids.join(",")
    );
    if r.partition != v1::Partition::Chat as i32 && r.partition != 0 {
        s.push_str(&format!(" partition={}", partition_name(r.partition)));
    }
    s
}

fn describe(frame: &Frame) -> String {
    let Some(body) = &frame.body else {
        return format!("empty ref={}", frame.r#ref);
    };
    match body {
        Body::Welcome(w) => format!(
            "welcome user={} device={} session={} heartbeat_ms={} max_frame_bytes={} node={}",
            w.user, w.device, w.session, w.heartbeat_ms, w.max_frame_bytes, w.node
        ),
        Body::Awareness(a) => {
            let mut s = format!("awareness {} {}", a.from, status_name(a.status));
            if a.intent != 0 {
                s.push_str(&format!(" intent={}", status_name(a.intent)));
            }
            if !a.to.is_empty() {
                s.push_str(&format!(" to={}", a.to));
            }
            if !a.device.is_empty() {
                s.push_str(&format!(" device={}", a.device));
            }
            if a.last_seen != 0 {
                s.push_str(&format!(" last_seen={}", format_ts_ms(a.last_seen)));
            }
            if a.invisible {
                s.push_str(" invisible");
            }
            if a.ttl_ms != 0 {
                s.push_str(&format!(" ttl_ms={}", a.ttl_ms));
            }
            if !a.details.is_empty() {
                s.push_str(&format!(" details={:?}", a.details));
            }
            s
        }
        Body::Message(m) => describe_message(m),
        Body::Ack(a) => format!(
            "ack ref={} id={} offset={} duplicate={}",
            frame.r#ref, a.id, a.offset, a.duplicate
        ),
        Body::Receipt(r) => describe_receipt(r),
        Body::Batch(b) => {
            let mut s = format!(
                "batch {} contact={} messages={} more={} next={}",
                partition_name(b.partition),
                b.contact,
                b.messages.len(),
                b.more,
                b.next_offset
            );
            if !b.receipts.is_empty() {
                s.push_str(&format!(" receipts={}", b.receipts.len()));
            }
            for m in &b.messages {
                s.push_str("\n  ");
                s.push_str(&describe_message(m));
            }
            for r in &b.receipts {
                s.push_str("\n  ");
                s.push_str(&describe_receipt(r));
            }
            s
        }
        Body::Summary(sm) => {
            let mut s = format!("summary senders={}", sm.senders.len());
            for snd in &sm.senders {
                s.push_str(&format!(
                    "\n  {} unread={} first={} last={}",
                    snd.from, snd.unread, snd.first_offset, snd.last_offset
                ));
                if let Some(m) = &snd.last_message {
                    s.push_str(&format!(" last={}", payload_text(&m.payload)));
                }
            }
            s
        }
        Body::Subscribe(sub) => format!(
            "subscribe users=[{}] unsubscribe={}",
            sub.users.join(","),
            sub.unsubscribe
        ),
        Body::PushToken(p) => format!(
            "push_token platform={} remove={} sandbox={}",
            p.platform, p.remove, p.sandbox
        ),
        Body::Error(e) => format!(
            "error ref={} {}: {}",
            frame.r#ref,
            error_code_name(e.code),
            e.message
        ),
        Body::Ping(p) => format!("ping timestamp={}", p.timestamp),
        Body::Pong(_) => "pong".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen() -> Seen {
        Arc::default()
    }

    #[test]
    fn parses_commands() {
        let s = seen();
        let Ok(Cmd::Send(Body::Message(m))) = command("send --id m1 bob hello  world", &s) else {
            panic!("send")
        };
        assert_eq!((m.id.as_str(), m.to.as_str()), ("m1", "bob"));
        assert_eq!(&m.payload[..], b"hello  world");
        let Ok(Cmd::Send(Body::Message(a))) = command("send bob x", &s) else {
            panic!("send")
        };
        let Ok(Cmd::Send(Body::Message(b))) = command("send bob y", &s) else {
            panic!("send")
        };
        assert_ne!(a.id, b.id);
        assert!(command("read bob", &s).is_err(), "no offset seen yet");
        note_offsets(
            &Frame::with(
                0,
                Body::Message(v1::Message {
                    from: "bob".into(),
                    to: "me".into(),
                    offset: 7,
                    partition: v1::Partition::Chat as i32,
                    ..Default::default()
                }),
            ),
            "me",
            &s,
        );
        let Ok(Cmd::Send(Body::Receipt(r))) = command("read bob", &s) else {
            panic!("read")
        };
        assert_eq!((r.up_to_offset, r.kind), (7, v1::ReceiptKind::Read as i32));
        let Ok(Cmd::Send(Body::Awareness(a))) = command("resume bob 3 10", &s) else {
            panic!("resume")
        };
        assert_eq!((a.from_offset, a.limit), (3, 10));
        assert!(command("frobnicate", &s).is_err());
        assert!(command("status sleepy", &s).is_err());
        assert!(command("raw {\"ref\":\"9\",\"ping\":{}}", &s).is_ok());
        assert!(command("raw nope", &s).is_err());
    }

    #[test]
    fn renders_lines() {
        let f = Frame::with(
            2,
            Body::Ack(v1::Ack {
                id: "m1".into(),
                offset: 3,
                ..Default::default()
            }),
        );
        assert_eq!(describe(&f), "ack ref=2 id=m1 offset=3 duplicate=false");
        let f = Frame::with(
            0,
            Body::Message(v1::Message {
                id: "m1".into(),
                from: "alice".into(),
                to: "bob".into(),
                offset: 3,
                partition: v1::Partition::Chat as i32,
                payload: b"hello".to_vec().into(),
                ..Default::default()
            }),
        );
        assert_eq!(describe(&f), "message #3 alice→bob id=m1 \"hello\"");
        assert_eq!(payload_text(&[0xff, 0]), "base64:/wA=");
        let f = Frame::error(5, v1::ErrorCode::BadRequest, "nope");
        assert_eq!(describe(&f), "error ref=5 BAD_REQUEST: nope");
    }
}
