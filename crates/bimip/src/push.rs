//! `bimip push test`: asks a running server to send a test push to a user's devices now and
//! prints what each provider answered.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct PushArgs {
    #[command(subcommand)]
    command: PushCommand,
}

#[derive(Subcommand)]
enum PushCommand {
    /// Send a test push to a user's devices (or one) and print each provider's answer.
    Test(TestArgs),
}

#[derive(Args)]
struct TestArgs {
    /// Base URL of the server's HTTP API.
    #[arg(long, env = "BIMIP_HTTP_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The server's API key.
    #[arg(long, env = "BIMIP_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The user whose devices get the push.
    #[arg(long)]
    user: String,
    /// Only this device (default: every device of the user with a push token).
    #[arg(long)]
    device: Option<String>,
}

pub async fn run(args: PushArgs) -> anyhow::Result<()> {
    match args.command {
        PushCommand::Test(t) => test(t).await,
    }
}

async fn test(a: TestArgs) -> anyhow::Result<()> {
    let url = format!("{}/v1/push/test", a.url.trim_end_matches('/'));
    let body = serde_json::json!({ "user": a.user, "device": a.device });
    let resp = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()?
        .post(&url)
        .bearer_auth(&a.api_key)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let json: serde_json::Value = resp
        .json()
        .await
        .with_context(|| format!("POST {url}: the answer is not JSON"))?;
    if !status.is_success() {
        let msg = json["error"]["message"].as_str().unwrap_or("no message");
        bail!("{status}: {msg}");
    }
    let mut all_sent = true;
    for r in json["results"].as_array().into_iter().flatten() {
        let outcome = r["outcome"].as_str().unwrap_or("?");
        all_sent &= outcome == "sent";
        println!(
            "device={} platform={} outcome={} {}",
            r["device"].as_str().unwrap_or("?"),
            r["platform"].as_str().unwrap_or("?"),
            outcome,
            r["detail"].as_str().unwrap_or(""),
        );
    }
    if !all_sent {
        bail!("not every push was accepted by its provider");
    }
    Ok(())
}
