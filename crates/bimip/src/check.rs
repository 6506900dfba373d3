//! `bimip check`: verifies every user's files in a data dir (docs/OPERATIONS.md §6) and, with `--repair`,
//! fixes what start-up recovery would (torn tails cut, bad lines dropped with the original kept
//! aside as `.corrupt-<unix_ms>`, corrupt profiles moved aside). Exits with 1 while problems
//! remain.

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct CheckArgs {
    /// Data directory of the server.
    #[arg(long, env = "BIMIP_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Fix what can be fixed (stop the server first); nothing is deleted.
    #[arg(long)]
    pub repair: bool,
    /// Check the data in this Redis instead of a data dir (several nodes); only reads.
    #[arg(long, env = "BIMIP_REDIS", hide_env_values = true)]
    pub redis: Option<String>,
    /// Prefix of bimip's Redis keys.
    #[arg(long, env = "BIMIP_REDIS_PREFIX", default_value = "bimip")]
    pub redis_prefix: String,
}

/// `bimip check --redis URL`: every user's keys and the push keys; exits 1 on problems.
async fn run_redis(args: &CheckArgs, url: &str) -> anyhow::Result<()> {
    if args.repair {
        anyhow::bail!("--repair works on a data dir; `check --redis` only reads");
    }
    let store = crate::inspect::redis_store(url, &args.redis_prefix).await?;
    let report = bimip_store::check_redis(&store).await?;
    print!(
        "{} (prefix {}): {report}",
        bimip_store::redis::redact(url),
        args.redis_prefix
    );
    if !report.is_clean() {
        std::process::exit(1);
    }
    Ok(())
}

pub async fn run(args: CheckArgs) -> anyhow::Result<()> {
    if let Some(url) = &args.redis {
        return run_redis(&args, url).await;
    }
    let report = bimip_store::check_data_dir(&args.data_dir, args.repair)
        .with_context(|| format!("checking {}", args.data_dir.display()))?;
    for p in &report.problems {
        println!("{p}");
    }
    for p in &report.repaired {
        println!("{p} (repaired)");
    }
    for p in &report.notes {
        println!("{p} (note)");
    }
    println!(
        "{}: {} users, {} records, {} problems, {} repaired",
        args.data_dir.display(),
        report.users,
        report.records,
        report.problems.len(),
        report.repaired.len()
    );
    if !report.problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
