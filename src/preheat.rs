//! `shoal preheat AGENT_URL IMAGE`: ask an agent to download every blob of an image, showing
//! progress while it runs.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use shoal_agent::preheat::PreheatEvent;

#[derive(clap::Args, Debug)]
pub struct PreheatArgs {
    /// Agent base URL, e.g. http://127.0.0.1:5001
    pub agent: String,
    /// Image as repo:tag or repo@digest
    pub image: String,
    /// Only this platform of a multi-platform image (os/arch[/variant])
    #[arg(long)]
    pub platform: Option<String>,
    /// Bearer token for a private repository (from the origin's /token, pull scope)
    #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Give up after this long
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Trust a CA (--tls-ca) for an https agent, or present a certificate
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

fn bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let filled = done.saturating_mul(WIDTH).checked_div(total).unwrap_or(WIDTH).min(WIDTH);
    format!("[{}{}]", "#".repeat(filled as usize), ".".repeat((WIDTH - filled) as usize))
}

pub async fn run(args: PreheatArgs) -> anyhow::Result<()> {
    let client =
        shoal_tls::http_client().connect_timeout(Duration::from_secs(10)).timeout(args.timeout).build()?;
    let url = format!("{}/v1/preheat", args.agent.trim_end_matches('/'));
    let body = serde_json::json!({ "image": args.image, "platform": args.platform });
    let mut request = client.post(&url).json(&body);
    if let Some(token) = &args.token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.with_context(|| format!("POST {url}"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "agent answered {}: {}",
        response.status(),
        response.text().await?
    );
    let mut lines = response.bytes_stream();
    let mut buf = Vec::new();
    let (mut total_blobs, mut total_bytes, mut done_blobs, mut done_bytes) = (0usize, 0u64, 0usize, 0u64);
    let mut err = std::io::stderr();
    while let Some(chunk) = lines.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let event: PreheatEvent =
                serde_json::from_slice(&line).context("reading the agent's progress")?;
            match event {
                PreheatEvent::Plan { blobs, bytes } => {
                    total_blobs = blobs;
                    total_bytes = bytes;
                }
                PreheatEvent::BlobDone { size, .. } => {
                    done_blobs += 1;
                    done_bytes += size;
                }
                PreheatEvent::Failed { message } => {
                    writeln!(err)?;
                    anyhow::bail!("preheat failed: {message}");
                }
                PreheatEvent::Done { blobs, bytes } => {
                    writeln!(
                        err,
                        "\r{} {blobs}/{blobs} blobs, {} ",
                        bar(1, 1),
                        bytesize::ByteSize::b(bytes)
                    )?;
                    println!("preheated {} ({blobs} blobs, {})", args.image, bytesize::ByteSize::b(bytes));
                    return Ok(());
                }
            }
            write!(
                err,
                "\r{} {done_blobs}/{total_blobs} blobs, {} / {} ",
                bar(done_bytes, total_bytes),
                bytesize::ByteSize::b(done_bytes),
                bytesize::ByteSize::b(total_bytes)
            )?;
            err.flush()?;
        }
    }
    anyhow::bail!("the agent closed the progress stream before the preheat finished")
}
