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
}

pub fn run(args: CheckArgs) -> anyhow::Result<()> {
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
