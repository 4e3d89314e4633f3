//! `shoal-sim`: run a simulated fleet and print what it shows. The last line is always
//! `sim: peers=N p50=X p99=Y max=Z (x limit) origin=E xS duplicates=D xS wall=Ws`, so
//! anyone can reproduce a figure from the command that made it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use shoal_sim::scenario::{self, Params, Scenario};
use shoal_sim::svg::{self, Series};

#[derive(Parser, Debug)]
#[command(name = "shoal-sim", about = "Simulate a Shoal fleet pulling an image, with Shoal's own scheduler")]
struct Args {
    /// Hosts pulling (ignored with --sweep).
    #[arg(long, default_value_t = 10)]
    peers: usize,
    /// Image size in MiB (split into --layers blobs).
    #[arg(long, default_value_t = 128.0)]
    blob_mib: f64,
    /// Each host's link rate, Mbit/s (both directions).
    #[arg(long, value_parser = parse_positive, default_value_t = 50.0)]
    host_mbit: f64,
    /// The origin's link rate, Mbit/s.
    #[arg(long, value_parser = parse_positive, default_value_t = 500.0)]
    origin_mbit: f64,
    /// Share of hosts at a fifth of the rate.
    #[arg(long)]
    stragglers: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// all-at-once, staggered, stragglers, churn, layers, dead-tracker, origin-lost.
    #[arg(long, default_value = "all-at-once")]
    scenario: Scenario,
    /// Blobs the image is split into (the layers scenario defaults to 2).
    #[arg(long)]
    layers: Option<usize>,
    /// Staggered: starts spread over this many seconds (default: the link time).
    #[arg(long, value_parser = parse_seconds)]
    stagger_secs: Option<f64>,
    /// Churn: share of hosts that die mid-pull (default 0.1).
    #[arg(long)]
    churn: Option<f64>,
    /// Round trip between hosts in ms, queueing included (default 25.2).
    #[arg(long, value_parser = parse_seconds)]
    rtt_ms: Option<f64>,
    /// Recompute rates at most every this many ms (0: exact; default 0 up to 200 peers, else 20).
    #[arg(long, value_parser = parse_seconds)]
    rate_epoch_ms: Option<f64>,
    /// Outbound connections per download (the agent's `max_connections_per_blob`, default 10).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Peers an agent serves one blob to at once (the agent's `max_peers_per_blob`, default
    /// 12; 0: no cap).
    #[arg(long)]
    max_peers_per_blob: Option<usize>,
    /// Pieces an origin sends at once (the origin's `peer_upload_slots`, default 16; 0: no
    /// limit).
    #[arg(long)]
    origin_upload_slots: Option<usize>,
    /// Pieces an agent sends at once (default: no limit, as agents do).
    #[arg(long)]
    agent_upload_slots: Option<usize>,
    /// Peers an agent sends one piece to at once (the agent's `max_sends_per_piece`, default
    /// 2; 0: no limit).
    #[arg(long)]
    max_sends_per_piece: Option<usize>,
    /// Piece length in KiB, a power of two from 64 to 4096 (default: what the origins choose
    /// for the blob's size: 512 KiB for 128 MiB, 1 MiB from 256 MiB up).
    #[arg(long, value_parser = parse_piece_kib)]
    piece_kib: Option<u64>,
    /// Run each of these fleet sizes (e.g. 10,100,1000) and plot completion against size.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    /// Print a line per simulated second to stderr: progress, connections, requests.
    #[arg(long)]
    trace: bool,
    /// Where the sweep's plot goes.
    #[arg(long, default_value = "sim-sweep.svg")]
    plot: String,
}

fn millis(ms: f64) -> Duration {
    Duration::from_secs_f64(ms.max(0.0) / 1000.0)
}

fn params(a: &Args, peers: usize) -> Params {
    Params {
        peers,
        blob_bytes: (a.blob_mib * 1024.0 * 1024.0).round() as u64,
        host_mbit: a.host_mbit,
        origin_mbit: a.origin_mbit,
        stragglers: a.stragglers,
        seed: a.seed,
        layers: a.layers,
        stagger: a.stagger_secs.map(Duration::from_secs_f64),
        churn: a.churn,
        rtt: a.rtt_ms.map(millis),
        rate_epoch: a.rate_epoch_ms.map(millis),
        max_connections: a.max_connections,
        max_peers_per_blob: a.max_peers_per_blob,
        origin_upload_slots: a.origin_upload_slots,
        agent_upload_slots: a.agent_upload_slots,
        max_sends_per_piece: a.max_sends_per_piece,
        piece_length: a.piece_kib.map(|k| k * 1024),
        trace: a.trace,
    }
}

/// The piece lengths the wire format and the origins accept: powers of two from
/// `MIN_PIECE_LENGTH` to `MAX_PIECE_LENGTH`.
/// A link rate: a number above zero (a zero rate made the link time infinite, and scenarios
/// that place events along it panicked).
fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err(format!("{s} must be a number above zero")),
        Err(e) => Err(e.to_string()),
    }
}

/// A time: a finite number, zero or more.
fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(_) => Err(format!("{s} must be a number from zero up")),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_piece_kib(s: &str) -> Result<u64, String> {
    use shoal_p2p::metainfo::{MAX_PIECE_LENGTH, MIN_PIECE_LENGTH};
    let kib: u64 = s.parse().map_err(|e| format!("{e}"))?;
    let (min, max) = (MIN_PIECE_LENGTH / 1024, MAX_PIECE_LENGTH / 1024);
    if kib.is_power_of_two() && (min..=max).contains(&kib) {
        Ok(kib)
    } else {
        Err(format!("{kib} KiB is not a power of two from {min} to {max}"))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let sizes = if args.sweep.is_empty() { vec![args.peers] } else { args.sweep.clone() };
    let mut points = Vec::new();
    let mut last = None;
    for &peers in &sizes {
        let cfg = scenario::build(args.scenario, &params(&args, peers));
        let started = Instant::now();
        let outcome = match shoal_sim::run(cfg) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("shoal-sim: {e}");
                return ExitCode::FAILURE;
            }
        };
        let wall = started.elapsed().as_secs_f64();
        println!("{}", outcome.details());
        let line = outcome.summary(wall);
        if !args.sweep.is_empty() {
            println!("{line}");
        }
        points.push((peers as f64, outcome.spread(|_| true), outcome.origin_x()));
        last = Some(line);
    }
    if !args.sweep.is_empty() {
        let series = vec![
            Series {
                name: "p50".into(),
                color: "#1f77b4",
                points: points.iter().map(|(n, s, _)| (*n, s.p50)).collect(),
            },
            Series {
                name: "p99".into(),
                color: "#d62728",
                points: points.iter().map(|(n, s, _)| (*n, s.p99)).collect(),
            },
            Series {
                name: "max".into(),
                color: "#9467bd",
                points: points.iter().map(|(n, s, _)| (*n, s.max)).collect(),
            },
            Series {
                name: "origin ÷ size".into(),
                color: "#2ca02c",
                points: points.iter().map(|(n, _, o)| (*n, *o)).collect(),
            },
        ];
        let title = format!(
            "shoal-sim {}: {} MiB, {} Mbit/s hosts, {} Mbit/s origin",
            args.scenario.name(),
            args.blob_mib,
            args.host_mbit,
            args.origin_mbit
        );
        let chart = svg::chart(
            &title,
            "hosts",
            "completion ÷ (size ÷ host rate)",
            &series,
            &[(1.0, "link time"), (1.3, "goal p99")],
        );
        if let Err(e) = std::fs::write(&args.plot, chart) {
            eprintln!("shoal-sim: writing {}: {e}", args.plot);
            return ExitCode::FAILURE;
        }
        eprintln!("shoal-sim: plot written to {}", args.plot);
    }
    if let Some(line) = last {
        println!("{line}");
    }
    ExitCode::SUCCESS
}
