//! `shoal`: one binary for every Shoal role. This file only parses the command line, sets up
//! logging and hands over to the role's module.

mod agent;
mod atomic_file;
mod certs;
mod config;
mod http;
mod http_server;
mod malloc;
mod node;
mod open_files;
mod origin;
mod origin_admin;
mod origin_forward;
mod passwd;
mod peer_addr;
mod preheat;
mod readiness;
mod tls;
mod tracker;
mod up;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(name = "shoal", version, about = "Peer-to-peer container registry")]
struct Cli {
    /// Log filter (tracing EnvFilter syntax)
    #[arg(long, global = true, env = "SHOAL_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run an origin: the registry CI pushes to
    Origin(origin::OriginArgs),
    /// Run an agent: the read-only registry on every node, fed by the swarm
    Agent(agent::AgentArgs),
    /// Run a tracker: peer lists per blob for the agents' swarms
    Tracker(tracker::TrackerArgs),
    /// Run a whole local Shoal with embedded defaults
    Up(up::UpArgs),
    /// Warm an agent's cache with every blob of an image, showing progress
    Preheat(preheat::PreheatArgs),
    /// Print the argon2 hash of a password (stdin or a prompt) for `[[auth.users]] password_argon2`
    Passwd(passwd::PasswdArgs),
    /// Prepare a Kubernetes node for the agent (containerd mirror config), undo it, or wait for that
    Node(node::NodeArgs),
    /// Make a cluster CA and issue certificates for origins, trackers, agents and operators
    Certs(certs::CertsArgs),
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    malloc::tune();
    let open_files = open_files::raise();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log)?)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    open_files::report(open_files);
    match cli.command {
        Command::Origin(args) => {
            let config = args.resolve()?;
            tls::install(&config.tls)?;
            origin::bind(config).await?.serve(shutdown_signal()).await
        }
        Command::Agent(args) => {
            let config = args.resolve()?;
            tls::install(&config.tls)?;
            agent::bind(config).await?.serve(shutdown_signal()).await
        }
        Command::Tracker(args) => {
            tls::install(&args.tls.settings())?;
            tracker::bind(args).await?.serve(shutdown_signal()).await
        }
        Command::Up(args) => up::run(args, shutdown_signal()).await,
        Command::Preheat(args) => {
            tls::install(&args.tls.settings())?;
            preheat::run(args).await
        }
        Command::Node(args) => node::run(args).await,
        Command::Certs(args) => certs::run(args),
        Command::Passwd(args) => passwd::run(args),
    }
}
