//! `shoal certs`: make a cluster CA and issue node and operator certificates with it, so a
//! cluster can run mutual TLS without other tools. (Certificates from cert-manager or any CA
//! work too, when their subject carries the role; see docs/security.md.)

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use shoal_registry::identity::Role;
use shoal_tls::Issued;

/// Default validity of a CA, in days.
const DEFAULT_CA_DAYS: u32 = 3650;
/// Default validity of a node certificate, in days.
const DEFAULT_CERT_DAYS: u32 = 90;

#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CertsCommand {
    /// Create a cluster CA: DIR/ca.pem (give it to every node) and DIR/ca-key.pem (keep it safe)
    Ca {
        /// Directory to write to (created if missing)
        #[arg(long)]
        out: PathBuf,
        /// The CA's name
        #[arg(long, default_value = "Shoal cluster CA")]
        name: String,
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// Issue a certificate signed by the CA: OUT/NAME.pem and OUT/NAME-key.pem
    Issue {
        /// Directory holding ca.pem and ca-key.pem
        #[arg(long)]
        ca: PathBuf,
        /// The node's (or operator's) name: the certificate's common name
        #[arg(long)]
        name: String,
        /// What it is for: origin, tracker, agent or admin
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// A DNS name clients reach it by (repeatable)
        #[arg(long)]
        dns: Vec<String>,
        /// An IP address clients reach it by (repeatable)
        #[arg(long)]
        ip: Vec<IpAddr>,
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: u32,
        /// Directory to write to [default: --ca]
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::ALL
        .into_iter()
        .find(|r| r.unit().strip_prefix("shoal-") == Some(s) || r.unit() == s)
        .ok_or_else(|| format!("{s:?} is not a role: origin, tracker, agent or admin"))
}

/// Write `contents` to `path`; private keys readable by the owner only.
fn write(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The CA in `dir`.
pub fn read_ca(dir: &Path) -> anyhow::Result<Issued> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    Ok(Issued { cert_pem: read("ca.pem")?, key_pem: read("ca-key.pem")? })
}

/// Write a new CA into `dir`.
pub fn write_ca(dir: &Path, name: &str, days: u32) -> anyhow::Result<Issued> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = shoal_tls::new_ca(name, days)?;
    write(&dir.join("ca-key.pem"), &ca.key_pem, true)?;
    write(&dir.join("ca.pem"), &ca.cert_pem, false)?;
    Ok(ca)
}

/// Issue a certificate with the CA and write it into `out`; returns (cert, key) paths.
pub fn write_issued(
    ca: &Issued,
    out: &Path,
    name: &str,
    role: Role,
    dns: &[String],
    ips: &[IpAddr],
    days: u32,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    if name.contains(['/', '\\']) || name.starts_with('.') {
        anyhow::bail!("{name:?} cannot be a file name");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let issued = shoal_tls::issue(ca, name, role, dns, ips, days)?;
    let (cert, key) = (out.join(format!("{name}.pem")), out.join(format!("{name}-key.pem")));
    write(&key, &issued.key_pem, true)?;
    write(&cert, &issued.cert_pem, false)?;
    Ok((cert, key))
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Ca { out, name, days } => {
            write_ca(&out, &name, days)?;
            println!("{}", out.join("ca.pem").display());
        }
        CertsCommand::Issue { ca, name, role, dns, ip, days, out } => {
            let authority = read_ca(&ca)?;
            let (cert, key) =
                write_issued(&authority, out.as_deref().unwrap_or(&ca), &name, role, &dns, &ip, days)?;
            println!("{}\n{}", cert.display(), key.display());
        }
    }
    Ok(())
}
