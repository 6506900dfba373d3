//! `bimip`: the server and its tools in one binary.

mod bench;
mod check;
mod client;
mod inspect;
mod push;
mod serve;
mod token;

use clap::{Parser, Subcommand};

/// jemalloc instead of the system allocator: less memory per idle connection (no per-thread
/// arena growth) and cheaper handshakes (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "bimip",
    version,
    about = "Presence and message-delivery server for chat apps"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (HTTP API and WebSocket gateway on one port).
    Serve(Box<serve::ServeArgs>),
    /// Mint a JWT for a user (development and testing).
    Token(token::TokenArgs),
    /// Connect as a user and send/receive frames, interactively or from a script.
    Client(client::ClientArgs),
    /// Print a user's queue and device cursors from the data dir, decoded.
    Inspect(inspect::InspectArgs),
    /// Verify a data dir (every user's files); `--repair` fixes what start-up recovery would.
    Check(check::CheckArgs),
    /// Load generator: chat, offline, idle, presence, mixed and push scenarios.
    Bench(bench::BenchArgs),
    /// Push tools: send a test push to a user's devices through a running server.
    Push(push::PushArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Every HTTPS client of the process (push providers, webhooks, bench) uses ring.
    bimip_push::http::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve::run(*args)),
        Command::Token(args) => token::run(args),
        Command::Client(args) => runtime.block_on(client::run(args)),
        Command::Inspect(args) => runtime.block_on(inspect::run(args)),
        Command::Check(args) => runtime.block_on(check::run(args)),
        Command::Bench(args) => runtime.block_on(bench::run(args)),
        Command::Push(args) => runtime.block_on(push::run(args)),
    }
}
