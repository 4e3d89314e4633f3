use super::*;
use clap::Parser;

#[derive(clap::Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: NodeCommand,
}

fn parse(args: &[&str]) -> Result<NodeCommand, clap::Error> {
    Cli::try_parse_from(std::iter::once("shoal-node").chain(args.iter().copied())).map(|c| c.command)
}

fn setup_plan(hosts_dir: &Path, registries: &str) -> SetupPlan {
    let dir = hosts_dir.to_str().unwrap();
    match parse(&["setup", "--hosts-dir", dir, "--registry", registries, "--mirror", "http://127.0.0.1:5000"])
        .unwrap()
    {
        NodeCommand::Setup(args) => SetupPlan::new(args).unwrap(),
        other => panic!("parsed as {other:?}"),
    }
}

const FOREIGN: &[u8] = b"server = \"https://mirror.example\"\r\n\n[host.\"https://x\"]\n";

#[test]
fn registry_defaults_and_names() {
    assert_eq!(parse_registry("docker.io").unwrap().server, "https://registry-1.docker.io");
    assert_eq!(parse_registry("ghcr.io").unwrap().server, "https://ghcr.io");
    assert_eq!(
        parse_registry("foo:5000").unwrap(),
        Registry { name: "foo:5000".into(), server: "https://foo:5000".into() }
    );
    assert_eq!(
        parse_registry("foo:5000=http://foo:5000/").unwrap().server,
        "http://foo:5000",
        "an explicit server, trailing slash dropped"
    );
    for bad in [
        "",
        "..",
        ".",
        "a/b",
        "../etc",
        "a b",
        "a\tb",
        "docker.io=ftp://x",
        "x=http://a\"b",
        "_default",
        "_x",
    ] {
        assert!(parse_registry(bad).is_err(), "{bad:?} accepted");
    }
    assert!(parse(&["setup", "--registry", "a/b", "--mirror", "http://m"]).is_err());
    assert!(parse(&["setup", "--registry", "x"]).is_err(), "--registry needs --mirror");
    let NodeCommand::Setup(args) = parse(&["setup", "--mirror", "http://m"]).unwrap() else {
        panic!("not setup")
    };
    assert!(SetupPlan::new(args).is_err(), "neither --registry nor --data-dir: nothing to do");
    let NodeCommand::Setup(args) = parse(&["setup", "--data-dir", "/d", "--owner", "1:2"]).unwrap() else {
        panic!("not setup")
    };
    assert!(SetupPlan::new(args).is_ok(), "only the data dir (containerd.enabled=false)");
    assert!(parse(&["setup", "--registry", "x", "--mirror", "m"]).is_err(), "mirror is a URL");
    assert!(parse(&["setup", "--registry", "x", "--mirror", "http://m", "--owner", "1:1"]).is_err());
}

#[test]
fn flags_and_defaults() {
    let NodeCommand::Setup(args) =
        parse(&["setup", "--registry", "docker.io,foo:5000", "--mirror", "http://127.0.0.1:5000"]).unwrap()
    else {
        panic!("not setup")
    };
    assert_eq!(args.hosts_dir, PathBuf::from("/etc/containerd/certs.d"));
    assert_eq!(args.registry.len(), 2);
    assert_eq!(*args.dial_timeout, Duration::from_millis(200));
    let plan = SetupPlan::new(args).unwrap();
    assert_eq!(plan.dial_timeout, "200ms");
    let NodeCommand::Wait(args) = parse(&["wait", "--endpoint", "x:1"]).unwrap() else { panic!("not wait") };
    assert_eq!((*args.timeout, *args.settle), (Duration::from_secs(600), Duration::from_secs(10)));
    assert_eq!(parse_owner("65532:65533").unwrap(), (65532, 65533));
    assert!(parse_owner("nobody:nogroup").is_err());
    assert_eq!(go_duration(Duration::from_millis(1500)).unwrap(), "1500ms");
    assert!(go_duration(Duration::from_micros(10)).is_err());
}

#[test]
fn plans() {
    let ours = hosts_toml("https://s", "http://m", "200ms", None);
    let other_ours = hosts_toml("https://s", "http://other", "200ms", None);
    assert_eq!(plan_setup(None, false, ours.as_bytes()), SetupAction::Write);
    assert_eq!(plan_setup(Some(ours.as_bytes()), false, ours.as_bytes()), SetupAction::Unchanged);
    assert_eq!(plan_setup(Some(other_ours.as_bytes()), true, ours.as_bytes()), SetupAction::Write);
    assert_eq!(plan_setup(Some(FOREIGN), false, ours.as_bytes()), SetupAction::BackUpThenWrite);
    assert_eq!(plan_setup(Some(FOREIGN), true, ours.as_bytes()), SetupAction::Conflict);
    assert_eq!(plan_restore(None, true), RestoreAction::PutBack, "a setup stopped after the backup");
    assert_eq!(plan_restore(None, false), RestoreAction::Nothing);
    assert_eq!(plan_restore(Some(FOREIGN), false), RestoreAction::Nothing);
    assert_eq!(plan_restore(Some(FOREIGN), true), RestoreAction::ForeignWithBackup);
    assert_eq!(plan_restore(Some(ours.as_bytes()), true), RestoreAction::PutBack);
    assert_eq!(plan_restore(Some(ours.as_bytes()), false), RestoreAction::Remove);
    // The marker must be the whole first line.
    assert!(!is_ours(format!("{MARKER_LINE} and more\n").as_bytes()));
    assert!(is_ours(format!("{MARKER_LINE}\r\nserver = \"x\"\n").as_bytes()));
}

#[test]
fn setup_backs_up_once_and_restore_puts_back_the_original() {
    let tmp = tempfile::tempdir().unwrap();
    let hosts_dir = tmp.path().join("certs.d");
    std::fs::create_dir_all(hosts_dir.join("docker.io")).unwrap();
    std::fs::write(hosts_dir.join("docker.io/hosts.toml"), FOREIGN).unwrap();
    std::fs::write(hosts_dir.join("docker.io/ca.crt"), b"cert").unwrap();
    let plan = setup_plan(&hosts_dir, "docker.io,foo:5000");

    let report = setup_blocking(&plan).unwrap();
    assert!(report[0].starts_with("docker.io: backed up"), "{report:?}");
    assert!(report[1].starts_with("foo:5000: wrote"), "{report:?}");
    assert_eq!(std::fs::read(hosts_dir.join("docker.io/hosts.toml.shoal-backup")).unwrap(), FOREIGN);
    let written = std::fs::read_to_string(hosts_dir.join("docker.io/hosts.toml")).unwrap();
    assert_eq!(
        written,
        format!(
            "{MARKER_LINE}\nserver = \"https://registry-1.docker.io\"\n\n[host.\"http://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = \"200ms\"\n"
        )
    );
    let foo = std::fs::read_to_string(hosts_dir.join("foo:5000/hosts.toml")).unwrap();
    assert!(foo.contains("server = \"https://foo:5000\""), "{foo}");
    assert!(shoal_registry::durable::leftovers(&hosts_dir.join("docker.io").join(HOSTS_FILE))
        .unwrap()
        .is_empty());

    // A pod restart runs setup again: nothing changes, the backup keeps the user's bytes.
    let report = setup_blocking(&plan).unwrap();
    assert!(report.iter().all(|l| l.contains("unchanged")), "{report:?}");
    assert_eq!(std::fs::read(hosts_dir.join("docker.io/hosts.toml.shoal-backup")).unwrap(), FOREIGN);
    // foo:5000 is no longer listed: its file of ours goes (its pulls would go on reaching the
    // agent); another install of Shoal (another mirror) keeps its files.
    let mut other = setup_plan(&hosts_dir, "bar:5000");
    other.mirror = "http://127.0.0.1:7000".into();
    setup_blocking(&other).unwrap();
    let report = setup_blocking(&setup_plan(&hosts_dir, "docker.io")).unwrap();
    assert!(report[1].starts_with("no longer listed: removed"), "{report:?}");
    assert_eq!(report.len(), 2, "{report:?}");
    assert!(!hosts_dir.join("foo:5000").exists());
    assert!(hosts_dir.join("bar:5000/hosts.toml").exists());
    std::fs::remove_dir_all(hosts_dir.join("bar:5000")).unwrap();
    // A new mirror rewrites ours, still without touching the backup.
    let mut moved = setup_plan(&hosts_dir, "docker.io");
    moved.mirror = "http://127.0.0.1:6000".into();
    let report = setup_blocking(&moved).unwrap();
    assert!(report[0].starts_with("docker.io: wrote"), "{report:?}");
    assert_eq!(std::fs::read(hosts_dir.join("docker.io/hosts.toml.shoal-backup")).unwrap(), FOREIGN);

    let report = restore_blocking(&hosts_dir).unwrap();
    assert_eq!(report.len(), 1, "{report:?}");
    assert_eq!(std::fs::read(hosts_dir.join("docker.io/hosts.toml")).unwrap(), FOREIGN);
    assert!(!hosts_dir.join("docker.io/hosts.toml.shoal-backup").exists());
    assert_eq!(std::fs::read(hosts_dir.join("docker.io/ca.crt")).unwrap(), b"cert");
    assert!(!hosts_dir.join("foo:5000").exists(), "our emptied directory is removed");
    assert!(hosts_dir.exists());

    // Restoring again changes nothing.
    assert_eq!(
        restore_blocking(&hosts_dir).unwrap(),
        vec![format!("nothing of shoal's in {}", hosts_dir.display())]
    );
    assert_eq!(std::fs::read(hosts_dir.join("docker.io/hosts.toml")).unwrap(), FOREIGN);
}

#[test]
fn restore_leaves_foreign_files_and_dirs_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let hosts_dir = tmp.path();
    for name in ["ghcr.io", "quay.io", "empty"] {
        std::fs::create_dir(hosts_dir.join(name)).unwrap();
    }
    std::fs::write(hosts_dir.join("ghcr.io/hosts.toml"), FOREIGN).unwrap();
    std::fs::write(hosts_dir.join("quay.io/hosts.toml"), FOREIGN).unwrap();
    std::fs::write(hosts_dir.join("quay.io/hosts.toml.shoal-backup"), b"older").unwrap();
    std::fs::write(hosts_dir.join("stray-file"), b"x").unwrap();
    // Ours beside a user's certificate: the file goes, the directory stays.
    setup_blocking(&setup_plan(hosts_dir, "reg:5000")).unwrap();
    std::fs::write(hosts_dir.join("reg:5000/client.cert"), b"c").unwrap();

    let report = restore_blocking(hosts_dir).unwrap();
    assert_eq!(report.len(), 2, "{report:?}");
    assert!(report[0].contains("left alone"), "{report:?}");
    assert!(report[1].contains("other files kept"), "{report:?}");
    assert_eq!(std::fs::read(hosts_dir.join("ghcr.io/hosts.toml")).unwrap(), FOREIGN);
    assert_eq!(std::fs::read(hosts_dir.join("quay.io/hosts.toml")).unwrap(), FOREIGN);
    assert_eq!(std::fs::read(hosts_dir.join("quay.io/hosts.toml.shoal-backup")).unwrap(), b"older");
    assert!(hosts_dir.join("empty").is_dir(), "an empty directory not ours stays");
    assert!(hosts_dir.join("stray-file").exists());
    assert!(!hosts_dir.join("reg:5000/hosts.toml").exists());
    assert!(hosts_dir.join("reg:5000/client.cert").exists());

    // Setup refuses to replace a user's file when a backup is already there.
    let err = setup_blocking(&setup_plan(hosts_dir, "quay.io")).unwrap_err();
    assert!(err.to_string().contains("already holds an earlier original"), "{err:#}");
    assert_eq!(std::fs::read(hosts_dir.join("quay.io/hosts.toml")).unwrap(), FOREIGN);

    // A hosts dir that is not there is nothing to do.
    assert!(restore_blocking(&hosts_dir.join("missing")).unwrap()[0].contains("does not exist"));
}

/// A conflict in any registry is found before anything is written: the first ones must not be
/// left pointing at an agent whose init container keeps failing.
#[test]
fn a_conflict_anywhere_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let hosts_dir = tmp.path();
    std::fs::create_dir(hosts_dir.join("quay.io")).unwrap();
    std::fs::write(hosts_dir.join("quay.io/hosts.toml"), FOREIGN).unwrap();
    std::fs::write(hosts_dir.join("quay.io/hosts.toml.shoal-backup"), b"older").unwrap();
    let err = setup_blocking(&setup_plan(hosts_dir, "docker.io,quay.io")).unwrap_err();
    assert!(err.to_string().contains("no hosts.toml was written"), "{err:#}");
    assert!(!hosts_dir.join("docker.io").exists());
}

/// A setup that stopped between setting the user's file aside and writing ours leaves only
/// the backup: restore puts it back. A directory that cannot be restored does not keep the
/// others from being restored, and fails the run.
#[test]
fn restore_puts_back_a_lone_backup_and_goes_past_a_directory_it_cannot_read() {
    let tmp = tempfile::tempdir().unwrap();
    let hosts_dir = tmp.path();
    // Unreadable even for root: its hosts.toml is a directory. Setup goes past it.
    std::fs::create_dir_all(hosts_dir.join("b.io/hosts.toml")).unwrap();
    let report = setup_blocking(&setup_plan(hosts_dir, "c.io")).unwrap();
    assert!(report.iter().any(|l| l.starts_with("could not check")), "{report:?}");
    std::fs::create_dir(hosts_dir.join("a.io")).unwrap();
    std::fs::write(hosts_dir.join("a.io/hosts.toml.shoal-backup"), FOREIGN).unwrap();
    let err = restore_blocking(hosts_dir).unwrap_err().to_string();
    assert!(err.contains("b.io"), "{err}");
    assert_eq!(std::fs::read(hosts_dir.join("a.io/hosts.toml")).unwrap(), FOREIGN);
    assert!(!hosts_dir.join("c.io").exists(), "the directory after the failing one was restored");
}

/// A registry directory that is a symlink is written through by setup and restored through
/// by restore; a hosts.toml that is a symlink leading nowhere from here (an absolute link into
/// the host's tree) is the user's: backed up as the link it is, and put back.
#[test]
fn symlinked_directories_and_files_are_restored() {
    let tmp = tempfile::tempdir().unwrap();
    let hosts_dir = tmp.path().join("certs.d");
    std::fs::create_dir_all(hosts_dir.join("real")).unwrap();
    std::os::unix::fs::symlink(hosts_dir.join("real"), hosts_dir.join("a.io")).unwrap();
    std::fs::create_dir_all(hosts_dir.join("b.io")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/hosts.toml", hosts_dir.join("b.io/hosts.toml")).unwrap();
    setup_blocking(&setup_plan(&hosts_dir, "a.io,b.io")).unwrap();
    assert!(is_ours(&std::fs::read(hosts_dir.join("real/hosts.toml")).unwrap()));
    let backup = hosts_dir.join("b.io/hosts.toml.shoal-backup");
    assert!(std::fs::symlink_metadata(&backup).unwrap().is_symlink(), "the user's link was not kept");
    restore_blocking(&hosts_dir).unwrap();
    assert!(!hosts_dir.join("real/hosts.toml").exists(), "ours stayed behind the linked directory");
    let link = std::fs::read_link(hosts_dir.join("b.io/hosts.toml")).unwrap();
    assert_eq!(link, PathBuf::from("/nonexistent/hosts.toml"));
    assert!(std::fs::symlink_metadata(&backup).is_err());
}

/// Two listed registries whose directories are one (a link between them) get one file, and
/// the user's original stays the backup. Before, the second registry's backup step renamed
/// our first file over the original: it was lost, and restore put back a file of ours.
#[test]
fn two_registries_in_one_directory_keep_the_users_original() {
    let tmp = tempfile::tempdir().unwrap();
    let hosts_dir = tmp.path();
    std::fs::create_dir_all(hosts_dir.join("docker.io")).unwrap();
    std::os::unix::fs::symlink(hosts_dir.join("docker.io"), hosts_dir.join("index.docker.io")).unwrap();
    std::fs::write(hosts_dir.join("docker.io/hosts.toml"), FOREIGN).unwrap();
    let report = setup_blocking(&setup_plan(hosts_dir, "docker.io,index.docker.io")).unwrap();
    assert!(
        report.iter().any(|l| l.starts_with("index.docker.io: the directory of docker.io")),
        "{report:?}"
    );
    let backup = hosts_dir.join("docker.io/hosts.toml.shoal-backup");
    assert_eq!(std::fs::read(&backup).unwrap(), FOREIGN, "the user's original is the backup");
    assert!(is_ours(&std::fs::read(hosts_dir.join("docker.io/hosts.toml")).unwrap()));
    restore_blocking(hosts_dir).unwrap();
    assert_eq!(std::fs::read(hosts_dir.join("docker.io/hosts.toml")).unwrap(), FOREIGN);
    assert!(!backup.exists());
    // A setup stopped between keeping the original (a hard link) and writing ours: the next
    // one writes ours, the backup stays the user's.
    std::fs::hard_link(hosts_dir.join("docker.io/hosts.toml"), &backup).unwrap();
    setup_blocking(&setup_plan(hosts_dir, "docker.io")).unwrap();
    assert!(is_ours(&std::fs::read(hosts_dir.join("docker.io/hosts.toml")).unwrap()));
    assert_eq!(std::fs::read(&backup).unwrap(), FOREIGN);
}

/// A hosts.toml that is a link to ours in a listed registry's directory is the user's: the
/// sweep of unlisted registries and restore leave it (it was removed, its directory too).
#[test]
fn a_link_to_our_file_is_not_ours() {
    let tmp = tempfile::tempdir().unwrap();
    let hosts_dir = tmp.path();
    // Named to sort before a.io: restore meets the link while our file is still there.
    std::fs::create_dir_all(hosts_dir.join("0.io")).unwrap();
    std::os::unix::fs::symlink("../a.io/hosts.toml", hosts_dir.join("0.io/hosts.toml")).unwrap();
    let report = setup_blocking(&setup_plan(hosts_dir, "a.io")).unwrap();
    assert_eq!(report.len(), 1, "{report:?}");
    assert!(std::fs::symlink_metadata(hosts_dir.join("0.io/hosts.toml")).unwrap().is_symlink());
    restore_blocking(hosts_dir).unwrap();
    assert!(std::fs::symlink_metadata(hosts_dir.join("0.io/hosts.toml")).unwrap().is_symlink());
    // A listed registry's directory that is a link leading nowhere from here: refused before
    // any hosts.toml is written.
    std::os::unix::fs::symlink("/nonexistent/dir", hosts_dir.join("c.io")).unwrap();
    let err = setup_blocking(&setup_plan(hosts_dir, "a.io,c.io")).unwrap_err().to_string();
    assert!(err.contains("not a directory"), "{err}");
    assert!(!hosts_dir.join("a.io/hosts.toml").exists());
}

#[test]
fn setup_creates_the_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let mut plan = setup_plan(&tmp.path().join("certs.d"), "x:1");
    plan.data_dir = Some(tmp.path().join("data/agent"));
    setup_blocking(&plan).unwrap();
    assert!(tmp.path().join("data/agent").is_dir());
    // Chown to ourselves works without root.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(tmp.path()).unwrap();
    plan.owner = Some((meta.uid(), meta.gid()));
    let report = setup_blocking(&plan).unwrap();
    assert!(report[0].contains(&format!("owned by {}:{}", meta.uid(), meta.gid())), "{report:?}");
}

/// A data directory another user made (the agent's uid changed in the chart) is handed over
/// whole, its cache and partial downloads too: before, only the directory itself was, and the
/// new user could write nothing under it. Needs root (chown to others).
#[test]
fn a_data_dir_of_another_user_is_handed_over_whole() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("agent");
    std::fs::create_dir_all(data.join("cache/sha256")).unwrap();
    std::fs::create_dir_all(data.join("partial")).unwrap();
    std::fs::write(data.join("cache/sha256/blob"), b"x").unwrap();
    std::os::unix::fs::symlink("/etc/hostname", data.join("partial/link")).unwrap();
    let owned = |p: &Path| {
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid())
    };
    let etc_hostname = owned(Path::new("/etc/hostname"));
    for p in ["", "cache", "cache/sha256", "cache/sha256/blob", "partial", "partial/link"] {
        std::os::unix::fs::lchown(data.join(p), Some(1000), Some(1000)).unwrap();
    }
    let mut plan = setup_plan(&tmp.path().join("certs.d"), "x:1");
    plan.data_dir = Some(data.clone());
    plan.owner = Some((2000, 2001));
    let report = setup_blocking(&plan).unwrap();
    assert!(report[0].contains("owned by 2000:2001 (6 entries handed over)"), "{report:?}");
    for p in ["", "cache", "cache/sha256", "cache/sha256/blob", "partial", "partial/link"] {
        assert_eq!(owned(&data.join(p)), (2000, 2001), "{p}");
    }
    assert_eq!(owned(Path::new("/etc/hostname")), etc_hostname, "a link's target is not followed");
    // The same owner again: nothing to hand over.
    let report = setup_blocking(&plan).unwrap();
    assert!(report[0].ends_with("owned by 2000:2001"), "{report:?}");
}

#[test]
fn settle_tracker() {
    let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
    let round = |entries: &[(SocketAddr, bool)]| entries.iter().copied().collect::<BTreeMap<_, _>>();
    let t0 = Instant::now();
    let at = |secs: u64| t0 + Duration::from_secs(secs);
    let mut t = SettleTracker::new(Duration::from_secs(10));
    assert!(!t.observe(at(0), &round(&[])), "no addresses is never done");
    assert!(!t.observe(at(20), &round(&[])));
    assert!(!t.observe(at(21), &round(&[(a, true), (b, false)])));
    assert!(!t.observe(at(22), &round(&[(a, true), (b, true)])));
    assert!(!t.observe(at(31), &round(&[(a, true), (b, true)])));
    // A new pod (a node joined) restarts the settle time...
    assert!(!t.observe(at(32), &round(&[(a, true)])));
    assert!(!t.observe(at(41), &round(&[(a, true)])));
    // ...and so does one that stops answering.
    assert!(!t.observe(at(41), &round(&[(a, false)])));
    assert!(!t.observe(at(42), &round(&[(a, true)])));
    assert!(t.observe(at(52), &round(&[(a, true)])));
    let mut t = SettleTracker::new(Duration::ZERO);
    assert!(t.observe(at(0), &round(&[(a, true)])), "no settle time: done at once");
}

fn fast(timeout_ms: u64, settle_ms: u64) -> WaitTiming {
    WaitTiming {
        timeout: Duration::from_millis(timeout_ms),
        settle: Duration::from_millis(settle_ms),
        poll_interval: Duration::from_millis(50),
        probe_timeout: Duration::from_millis(500),
    }
}

#[tokio::test]
async fn wait_for_a_real_server() {
    let ready = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ready_addr = ready.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(ready, restored_router()).await });
    wait_for(&ready_addr.to_string(), fast(5_000, 200)).await.unwrap();

    let busy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let unready = axum::Router::new().route(
        "/readyz",
        axum::routing::get(|| async { (reqwest::StatusCode::SERVICE_UNAVAILABLE, "no\n") }),
    );
    tokio::spawn(async move { axum::serve(busy, unready).await });
    let err = wait_for(&busy_addr.to_string(), fast(400, 0)).await.unwrap_err().to_string();
    assert!(err.contains(&format!("not ready: {busy_addr}")), "{err}");
}

#[test]
fn an_https_mirror_gets_its_ca_copied_into_the_data_dir_and_named_in_hosts_toml() {
    let tmp = tempfile::tempdir().unwrap();
    let hosts_dir = tmp.path().join("certs.d");
    let data_dir = tmp.path().join("agent");
    let ca = tmp.path().join("ca.crt");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
    let args = [
        "setup",
        "--hosts-dir",
        hosts_dir.to_str().unwrap(),
        "--registry",
        "reg:5000",
        "--mirror",
        "https://127.0.0.1:5000",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--mirror-ca",
        ca.to_str().unwrap(),
        "--host-data-dir",
        "/var/lib/shoal/agent",
    ];
    let NodeCommand::Setup(setup) = parse(&args).unwrap() else { panic!("not setup") };
    setup_blocking(&SetupPlan::new(setup).unwrap()).unwrap();
    assert_eq!(std::fs::read(data_dir.join(MIRROR_CA_FILE)).unwrap(), std::fs::read(&ca).unwrap());
    let hosts = std::fs::read_to_string(hosts_dir.join("reg:5000/hosts.toml")).unwrap();
    assert!(hosts.contains("[host.\"https://127.0.0.1:5000\"]"), "{hosts}");
    assert!(hosts.contains("  ca = \"/var/lib/shoal/agent/mirror-ca.pem\""), "{hosts}");
    // Something that is not a certificate is refused, and --mirror-ca needs --data-dir.
    std::fs::write(&ca, "not a certificate").unwrap();
    let NodeCommand::Setup(setup) = parse(&args).unwrap() else { panic!("not setup") };
    assert!(setup_blocking(&SetupPlan::new(setup).unwrap()).is_err());
    assert!(parse(&["setup", "--registry", "r", "--mirror", "https://m", "--mirror-ca", "/x"]).is_err());
    // A path hosts.toml cannot hold as a string (it would end it, and inject keys) is refused.
    let mut bad = args;
    bad[12] = "/var/lib/shoal\"\nskip_verify = true\n#";
    let NodeCommand::Setup(setup) = parse(&bad).unwrap() else { panic!("not setup") };
    let err = SetupPlan::new(setup).err().expect("refused").to_string();
    assert!(err.contains("quote, backslash or control character"), "{err}");
}
