//! `shoal preheat AGENT_URL IMAGE`: ask an agent to download every blob of an image, showing
//! progress while it runs.

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

/// Progress on a terminal: a bar of bytes with rate and time left.
const BAR_TEMPLATE: &str = "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}";
/// Progress in a log (stderr not a terminal): one line at most this often.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Shows progress: indicatif's bar on a terminal, plain lines otherwise.
struct Progress {
    bar: indicatif::ProgressBar,
    terminal: bool,
    last_line: std::time::Instant,
    blobs: (usize, usize),
}

impl Progress {
    fn new() -> Progress {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = if terminal { indicatif::ProgressBar::new(0) } else { indicatif::ProgressBar::hidden() };
        if let Ok(style) = indicatif::ProgressStyle::with_template(BAR_TEMPLATE) {
            bar.set_style(style);
        }
        Progress { bar, terminal, last_line: std::time::Instant::now(), blobs: (0, 0) }
    }

    fn plan(&mut self, blobs: usize, bytes: u64) {
        self.blobs = (0, blobs);
        self.bar.set_length(bytes);
        self.bar.set_message(format!("0/{blobs} blobs"));
        if !self.terminal {
            eprintln!("preheating {blobs} blobs, {}", bytesize::ByteSize::b(bytes));
        }
    }

    fn bytes(&mut self, held: u64) {
        self.bar.set_position(held);
        if !self.terminal && self.last_line.elapsed() >= LOG_EVERY {
            self.last_line = std::time::Instant::now();
            let total = self.bar.length().unwrap_or(0);
            eprintln!(
                "{} / {} ({} of {} blobs done)",
                bytesize::ByteSize::b(held),
                bytesize::ByteSize::b(total),
                self.blobs.0,
                self.blobs.1
            );
        }
    }

    fn blob_done(&mut self) {
        self.blobs.0 += 1;
        self.bar.set_message(format!("{}/{} blobs", self.blobs.0, self.blobs.1));
    }
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
    let mut progress = Progress::new();
    while let Some(chunk) = lines.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let event: PreheatEvent =
                serde_json::from_slice(&line).context("reading the agent's progress")?;
            match event {
                PreheatEvent::Plan { blobs, bytes } => progress.plan(blobs, bytes),
                PreheatEvent::Progress { bytes } => progress.bytes(bytes),
                PreheatEvent::BlobDone { .. } => progress.blob_done(),
                PreheatEvent::Failed { message } => {
                    progress.bar.abandon();
                    anyhow::bail!("preheat failed: {message}");
                }
                PreheatEvent::Done { blobs, bytes } => {
                    progress.bar.set_position(bytes);
                    progress.bar.finish_and_clear();
                    println!("preheated {} ({blobs} blobs, {})", args.image, bytesize::ByteSize::b(bytes));
                    return Ok(());
                }
            }
        }
    }
    progress.bar.abandon();
    anyhow::bail!("the agent closed the progress stream before the preheat finished")
}
