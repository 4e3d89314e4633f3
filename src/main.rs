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

/// A stop request (Ctrl-C or SIGTERM) to wait for.
pub(crate) type Stop = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM), listening from the moment
/// it is called: as PID 1 in a container a signal without a handler is ignored, and the
/// handlers were installed only once a server served, after a start (recovery, the first
/// membership view, the agent's cache) that may take minutes: a pod deleted meanwhile waited
/// out its grace period, or started and served until killed, never draining.
pub(crate) fn shutdown_signal() -> Stop {
    use tokio::signal::unix::{signal, SignalKind};
    let (term, int) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    Box::pin(async move {
        let received = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! { _ = received(term) => {}, _ = received(int) => {} }
        tracing::info!("shutting down");
    })
}

/// Serve what `bind` binds until `stop`; a stop while it binds ends the process there.
async fn serve_unless_stopped(
    bind: impl std::future::Future<Output = anyhow::Result<http::BoundServer>>,
    mut stop: Stop,
) -> anyhow::Result<()> {
    let server = tokio::select! {
        server = bind => server?,
        () = &mut stop => {
            tracing::info!("stopped while starting");
            return Ok(());
        }
    };
    server.serve(stop).await
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
            let stop = shutdown_signal();
            let config = args.resolve()?;
            tls::install(&config.tls)?;
            serve_unless_stopped(origin::bind(config), stop).await
        }
        Command::Agent(args) => {
            let stop = shutdown_signal();
            let config = args.resolve()?;
            tls::install(&config.tls)?;
            serve_unless_stopped(agent::bind(config), stop).await
        }
        Command::Tracker(args) => {
            let stop = shutdown_signal();
            tls::install(&args.tls.settings())?;
            serve_unless_stopped(tracker::bind(args), stop).await
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
