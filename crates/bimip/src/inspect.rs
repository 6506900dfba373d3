//! `bimip inspect`: prints a user's queue and device cursors from the data dir, decoded.

use anyhow::{Context, bail};
use bimip_proto::store::{IndexRecord, QueueRecord, QueueRecordKind};
use bimip_proto::v1;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// The user whose files to read.
    pub user: String,
    /// Data directory of the server.
    #[arg(long, env = "BIMIP_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Print one JSON object per record instead of readable lines (data dirs only).
    #[arg(long)]
    pub json: bool,
    /// Read the user's keys in this Redis instead of a data dir (several nodes).
    #[arg(long, env = "BIMIP_REDIS", hide_env_values = true)]
    pub redis: Option<String>,
    /// Prefix of bimip's Redis keys.
    #[arg(long, env = "BIMIP_REDIS_PREFIX", default_value = "bimip")]
    pub redis_prefix: String,
}

/// Connects to the Redis at `url` with `prefix` (for `inspect` and `check`).
pub(crate) async fn redis_store(
    url: &str,
    prefix: &str,
) -> anyhow::Result<bimip_store::RedisStore> {
    let mut cfg = bimip_store::RedisConfig::new(url);
    cfg.prefix = prefix.to_string();
    bimip_store::RedisStore::connect(cfg)
        .await
        .with_context(|| format!("connecting to {}", bimip_store::redis::redact(url)))
}

/// `bimip inspect --redis URL USER`: the user's keys, decoded where possible.
async fn run_redis(args: &InspectArgs, url: &str) -> anyhow::Result<()> {
    if args.json {
        bail!("--json reads a data dir; with --redis the output is text");
    }
    let store = redis_store(url, &args.redis_prefix).await?;
    let dump = bimip_store::inspect_redis_user(&store, &args.user)
        .await
        .with_context(|| format!("reading the keys of {}", args.user))?;
    print!("{dump}");
    Ok(())
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub(crate) fn format_ts_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

fn partition_name(v: i32) -> String {
    v1::Partition::try_from(v)
        .map(|p| {
            p.as_str_name()
                .trim_start_matches("PARTITION_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("partition({v})"))
}

fn kind_name(v: i32) -> String {
    v1::ReceiptKind::try_from(v)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("RECEIPT_KIND_")
                .to_string()
        })
        .unwrap_or_else(|_| format!("kind({v})"))
}

fn payload_short(p: &[u8]) -> String {
    const MAX: usize = 80;
    let s = crate::client::payload_text(p);
    if s.chars().count() <= MAX {
        return s;
    }
    let cut: String = s.chars().take(MAX).collect();
    format!("{cut}… ({} bytes)", p.len())
}

fn is_ack(r: &QueueRecord) -> bool {
    r.kind == QueueRecordKind::Ack as i32
}

fn is_mark(r: &QueueRecord) -> bool {
    r.kind == QueueRecordKind::Mark as i32
}

fn queue_line(line: u64, r: &QueueRecord) -> String {
    if is_mark(r) {
        return format!(
            "{line:>6} MARK last_offset={} (written by compaction) at={}",
            r.offset,
            format_ts_ms(r.timestamp)
        );
    }
    if is_ack(r) {
        let from = if r.from.is_empty() { "*" } else { &r.from };
        return format!(
            "{line:>6} ACK  up_to={} {} from={from} device={} at={}",
            r.offset,
            partition_name(r.partition),
            r.device,
            format_ts_ms(r.timestamp)
        );
    }
    let mut s = format!(
        "{line:>6} ITEM #{} {} {}→{} id={} device={} at={} acknowledged={}",
        r.offset,
        partition_name(r.partition),
        r.from,
        r.to,
        r.message_id,
        r.device,
        format_ts_ms(r.timestamp),
        r.acknowledged
    );
    if r.peer_offset != 0 {
        s.push_str(&format!(" peer_offset={}", r.peer_offset));
    }
    s.push(' ');
    s.push_str(&payload_short(&r.payload));
    s
}

fn index_line(line: u64, r: &IndexRecord) -> String {
    format!(
        "{line:>6} device={} {} {}→{} {} next_offset={} at={}",
        r.device,
        partition_name(r.partition),
        r.from,
        r.to,
        kind_name(r.kind),
        r.next_offset,
        format_ts_ms(r.timestamp)
    )
}

#[derive(Default)]
struct Counts {
    items: u64,
    acked: u64,
}

/// Items per partition, and how many are acknowledged (flag set, or covered by a later ACK).
fn counts(queue: &[(u64, QueueRecord)]) -> BTreeMap<i32, Counts> {
    let acks: Vec<&QueueRecord> = queue.iter().map(|(_, r)| r).filter(|r| is_ack(r)).collect();
    let mut out: BTreeMap<i32, Counts> = BTreeMap::new();
    for (_, r) in queue.iter().filter(|(_, r)| !is_ack(r) && !is_mark(r)) {
        let c = out.entry(r.partition).or_default();
        c.items += 1;
        let covered = acks.iter().any(|a| {
            a.partition == r.partition
                && r.offset <= a.offset
                && (a.from.is_empty() || a.from == r.from)
        });
        if r.acknowledged || covered {
            c.acked += 1;
        }
    }
    out
}

fn print_json(file: &str, line: u64, record: &impl serde::Serialize) -> anyhow::Result<()> {
    let v = serde_json::json!({ "file": file, "line": line, "record": record });
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}

pub async fn run(args: InspectArgs) -> anyhow::Result<()> {
    if let Err(e) = bimip_proto::validate_user_id(&args.user) {
        bail!("invalid user id {:?}: {e}", args.user);
    }
    if let Some(url) = &args.redis {
        return run_redis(&args, url).await;
    }
    let files =
        bimip_store::inspect_user(Path::new(&args.data_dir), &args.user).with_context(|| {
            format!(
                "reading the files of {} in {}",
                args.user,
                args.data_dir.display()
            )
        })?;

    if args.json {
        for (line, r) in &files.queue {
            print_json("queue", *line, r)?;
        }
        for (line, r) in &files.index {
            print_json("index", *line, r)?;
        }
    } else {
        println!("queue: {}", files.queue_path.display());
        println!("index: {}", files.index_path.display());
        println!();
        println!("queue records ({}):", files.queue.len());
        for (line, r) in &files.queue {
            println!("{}", queue_line(*line, r));
        }
        println!();
        println!("cursor records ({}):", files.index.len());
        for (line, r) in &files.index {
            println!("{}", index_line(*line, r));
        }
        println!();
        // The last record per (device, partition, from) is the current cursor.
        let mut cursors: BTreeMap<(String, i32, String), &IndexRecord> = BTreeMap::new();
        for (_, r) in &files.index {
            cursors.insert((r.device.clone(), r.partition, r.from.clone()), r);
        }
        println!("current cursors ({}):", cursors.len());
        for ((device, partition, from), r) in &cursors {
            println!(
                "  device={device} {} from={from} next_offset={} ({} at {})",
                partition_name(*partition),
                r.next_offset,
                kind_name(r.kind),
                format_ts_ms(r.timestamp)
            );
        }
        println!();
        println!("items:");
        let counts = counts(&files.queue);
        if counts.is_empty() {
            println!("  none");
        }
        for (p, c) in &counts {
            println!(
                "  {} items={} acked={} unacked={}",
                partition_name(*p),
                c.items,
                c.acked,
                c.items - c.acked
            );
        }
    }

    let push = bimip_store::inspect_push_user(Path::new(&args.data_dir), &args.user)
        .with_context(|| format!("reading the push files in {}", args.data_dir.display()))?;
    if args.json {
        for d in &push.devices {
            // Device tokens are masked here as everywhere the server shows them.
            let mut d = d.clone();
            d.token = bimip_push::mask_token(&d.token);
            println!("{}", serde_json::json!({"file": "push", "device": d}));
        }
        for m in &push.mutes {
            println!("{}", serde_json::json!({"file": "push", "mute": m}));
        }
    } else {
        print_push(&push);
    }

    let problems: Vec<_> = files.problems.iter().chain(&push.problems).collect();
    for (path, line, reason) in &problems {
        eprintln!("{}:{line}: {reason}", path.display());
    }
    if !problems.is_empty() {
        bail!("{} undecodable line(s)", problems.len());
    }
    Ok(())
}

/// The user's push devices and mutes, from `<data_dir>/push/`.
fn print_push(push: &bimip_store::PushUserFiles) {
    println!();
    println!("push devices ({}):", push.devices.len());
    for d in &push.devices {
        let platform = v1::Platform::try_from(d.platform)
            .map(|p| {
                p.as_str_name()
                    .trim_start_matches("PLATFORM_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_else(|_| format!("platform({})", d.platform));
        let last = if d.last_push_at > 0 {
            format_ts_ms(d.last_push_at)
        } else {
            "never".into()
        };
        println!(
            "  device={} {platform}{} token={} registered={} last_push={last}",
            d.device,
            if d.sandbox { " sandbox" } else { "" },
            bimip_push::mask_token(&d.token),
            format_ts_ms(d.registered_at),
        );
    }
    println!("mutes ({}):", push.mutes.len());
    for m in &push.mutes {
        println!("  {} since {}", m.other, format_ts_ms(m.since));
    }
    if !push.muted_by.is_empty() {
        println!("muted by ({}):", push.muted_by.len());
        for m in &push.muted_by {
            println!("  {} since {}", m.user, format_ts_ms(m.since));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(format_ts_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ts_ms(951_825_600_123), "2000-02-29T12:00:00.123Z");
        assert_eq!(format_ts_ms(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn ack_records_count_as_acknowledged() {
        let item = |offset, from: &str| QueueRecord {
            offset,
            partition: v1::Partition::Chat as i32,
            from: from.into(),
            ..Default::default()
        };
        let ack = QueueRecord {
            offset: 2,
            partition: v1::Partition::Chat as i32,
            from: "a".into(),
            kind: QueueRecordKind::Ack as i32,
            ..Default::default()
        };
        let q = vec![
            (1, item(1, "a")),
            (2, item(2, "b")),
            (3, item(3, "a")),
            (4, ack),
        ];
        let c = counts(&q);
        let chat = &c[&(v1::Partition::Chat as i32)];
        assert_eq!((chat.items, chat.acked), (3, 1));
        assert!(queue_line(4, &q[3].1).contains("ACK"));
    }
}
