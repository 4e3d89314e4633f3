//! `shoal certs`: make a cluster CA and issue node and operator certificates with it, so a
//! cluster can run mutual TLS without other tools. (Certificates from cert-manager or any CA
//! work too, when their subject carries the role; see docs/security.md.)

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

/// Write `contents` to `path` whole or not at all (a new file renamed over the old one), so a
/// private key is readable by its owner only even where an older file was not (a mode given
/// when opening applies only to a file the open creates).
fn write(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    crate::atomic_file::write(path, contents.as_bytes(), private.then_some(0o600))
}

/// The CA in `dir`.
pub fn read_ca(dir: &Path) -> anyhow::Result<Issued> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    Ok(Issued { cert_pem: read("ca.pem")?, key_pem: read("ca-key.pem")? })
}

/// Write a new CA into `dir`, which must not hold one: a CA's key replaced is every
/// certificate it issued no longer trusted by nodes given the new one, and the old key gone.
pub fn write_ca(dir: &Path, name: &str, days: u32) -> anyhow::Result<Issued> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in ["ca.pem", "ca-key.pem"] {
        let path = dir.join(file);
        anyhow::ensure!(
            !path.exists(),
            "{} exists: this directory already holds a CA (remove it first, or choose another --out)",
            path.display()
        );
    }
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
    // NAME.pem and NAME-key.pem must not be the CA's own files (`--out` defaults to the CA's
    // directory).
    if name == "ca" || name == "ca-key" {
        anyhow::bail!("{name:?} would overwrite the CA's own files; choose another --name");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_ca(dir.path(), "first", 30).unwrap();
        let err = write_ca(dir.path(), "second", 30).unwrap_err();
        assert!(err.to_string().contains("already holds a CA"), "{err}");
        assert_eq!(read_ca(dir.path()).unwrap().key_pem, first.key_pem, "the first CA's key is kept");
        for name in ["ca", "ca-key"] {
            let err = write_issued(&first, dir.path(), name, Role::Agent, &[], &[], 1).unwrap_err();
            assert!(err.to_string().contains("overwrite the CA"), "{name}: {err}");
        }
        assert_eq!(read_ca(dir.path()).unwrap().key_pem, first.key_pem);
    }

    #[cfg(unix)]
    #[test]
    fn an_issued_key_is_private_even_over_a_readable_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let ca = write_ca(dir.path(), "ca", 30).unwrap();
        let key = dir.path().join("node-key.pem");
        std::fs::write(&key, "old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let ips = ["127.0.0.1".parse().unwrap()];
        let (_, written) = write_issued(&ca, dir.path(), "node", Role::Agent, &[], &ips, 1).unwrap();
        assert_eq!(written, key);
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(std::fs::read_to_string(&key).unwrap().contains("PRIVATE KEY"));
        let ca_key = std::fs::metadata(dir.path().join("ca-key.pem")).unwrap().permissions().mode();
        assert_eq!(ca_key & 0o777, 0o600);
        assert!(shoal_registry::durable::leftovers(&key).unwrap().is_empty());
    }
}
