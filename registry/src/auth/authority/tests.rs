use super::*;
use crate::auth::rules::Action;

fn config() -> AuthConfig {
    AuthConfig {
        tokens: true,
        users: vec![
            User {
                name: "alice".into(),
                password: Some("a".into()),
                password_sha256: None,
                password_argon2: None,
                access: Access::None,
            },
            User {
                name: "ci".into(),
                password: Some("c".into()),
                password_sha256: None,
                password_argon2: None,
                access: Access::None,
            },
        ],
        rules: vec![
            Rule {
                repositories: "priv/*".into(),
                pull: vec!["alice".into()],
                push: vec!["ci".into()],
                delete: vec!["ci".into()],
                anonymous_pull: false,
            },
            Rule {
                repositories: "pub/*".into(),
                push: vec!["ci".into()],
                anonymous_pull: true,
                ..Rule::default()
            },
        ],
        login_failures: 2,
        ..AuthConfig::default()
    }
}

fn authority() -> (Authority, tempfile_dir::Dir) {
    let dir = tempfile_dir::Dir::new();
    (Authority::new(config(), &dir.0, &[]).unwrap(), dir)
}

mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Dir(std::env::temp_dir().join(format!("shoal-authority-{}-{n}", std::process::id())))
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn grants_the_intersection_of_asked_and_allowed() {
    let (a, _d) = authority();
    let asked = vec![Scope::Repository {
        name: "priv/app".into(),
        actions: vec![Action::Pull, Action::Push, Action::Delete],
    }];
    let alice = a.grant(&Principal::User("alice".into()), Access::None, &asked);
    assert_eq!(
        alice,
        vec![ResourceActions {
            kind: "repository".into(),
            name: "priv/app".into(),
            actions: vec!["pull".into()]
        }]
    );
    assert!(a.grant(&Principal::Anonymous, Access::None, &asked).is_empty());
    let public = vec![Scope::Repository { name: "pub/x".into(), actions: vec![Action::Pull, Action::Push] }];
    let anon = a.grant(&Principal::Anonymous, Access::None, &public);
    assert_eq!(anon[0].actions, vec!["pull".to_string()]);
}

#[tokio::test]
async fn tokens_round_trip_through_the_checks() {
    let (a, _d) = authority();
    let access = a.grant(
        &Principal::User("alice".into()),
        Access::None,
        &[Scope::Repository { name: "priv/app".into(), actions: vec![Action::Pull] }],
    );
    let t = a.issue("alice", access).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, format!("Bearer {}", t.token).parse().unwrap());
    let pull = [Need::Repo("priv/app".into(), Action::Pull)];
    let check = AccessCheck { headers: &headers, identity: None, needs: &pull };
    assert_eq!(a.authorize(&check).await.unwrap(), Principal::User("alice".into()));
    let push = [Need::Repo("priv/app".into(), Action::Push)];
    let check = AccessCheck { headers: &headers, identity: None, needs: &push };
    let err = a.authorize(&check).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unauthorized);
    // Published keys verify the token elsewhere.
    let published = a.published(&HeaderMap::new());
    assert!(KeySet::new(published.keys).verify(&t.token, "shoal").is_ok());
    assert!(published.policy.rules.iter().all(|r| r.pull.is_empty() && r.push.is_empty()));
    assert!(a.node_api_allows(&headers, None, None));
    // Acting for a repository (pull-through's fetch and stream), a token must grant pull there.
    assert!(a.node_api_allows(&headers, None, Some("priv/app")));
    assert!(!a.node_api_allows(&headers, None, Some("docker.io/acme/secret")));
    // Without a token, what an anonymous client may read (`pub/*`): as an anonymous token.
    assert!(a.node_api_allows(&HeaderMap::new(), None, None));
    assert!(a.node_api_allows(&HeaderMap::new(), None, Some("pub/app")));
    assert!(!a.node_api_allows(&HeaderMap::new(), None, Some("priv/app")));
    let basic = |u: &str, p: &str| {
        let mut h = HeaderMap::new();
        let v = format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{u}:{p}"))
        );
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    };
    assert!(!a.node_api_allows(&basic("alice", "a"), None, Some("priv/app")), "Basic is not a node's");
    // Over TLS the nodes have certificates: nothing for a caller without one or a token.
    assert_eq!(a.node_api_caller(&HeaderMap::new(), None, Some("pub/app"), true), None);
    assert_eq!(a.node_api_caller(&headers, None, Some("priv/app"), true), Some(NodeApiCaller::Client));
    // Nothing anonymous anywhere: nothing without a token.
    let other = tempfile_dir::Dir::new();
    let closed =
        Authority::new(AuthConfig { rules: config().rules[..1].to_vec(), ..config() }, &other.0, &[])
            .unwrap();
    assert!(!closed.node_api_allows(&HeaderMap::new(), None, None));
    assert!(!closed.node_api_allows(&HeaderMap::new(), None, Some("any/repo")));
}

#[test]
fn catalog_shows_what_the_principal_may_pull() {
    let (a, _d) = authority();
    let alice = a.visibility(&Principal::User("alice".into())).unwrap();
    assert!(alice("priv/app") && alice("pub/app") && !alice("other"));
    let anonymous = a.visibility(&Principal::Anonymous).unwrap();
    assert!(!anonymous("priv/app") && anonymous("pub/app"));
    assert!(a.visibility(&Principal::Node("n".into())).is_none());
}

#[tokio::test]
async fn failed_logins_are_rate_limited() {
    let (a, _d) = authority();
    assert!(a.login("alice", "x").await.unwrap().is_none());
    assert!(a.login("alice", "y").await.unwrap().is_none());
    // The right password is refused too while the name is blocked (unless it was checked
    // within the minute: `guesses_do_not_lock_out_a_remembered_login`).
    let err = a.login("alice", "a").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::TooManyRequests);
    assert!(a.login("ci", "c").await.unwrap().is_some());
}

/// Guesses under a user's name do not lock out a client whose login is remembered (its
/// password was proven within the minute); before, the fifth bad guess for `ci` made every
/// request of the real CI answer 429.
#[tokio::test]
async fn guesses_do_not_lock_out_a_remembered_login() {
    let (a, _d) = authority();
    assert!(a.login("alice", "a").await.unwrap().is_some());
    for guess in ["x", "y"] {
        assert!(a.login("alice", guess).await.unwrap().is_none());
    }
    assert_eq!(a.login("alice", "z").await.unwrap_err().code, ErrorCode::TooManyRequests);
    assert!(a.login("alice", "a").await.unwrap().is_some(), "the remembered login goes on");
    assert_eq!(
        a.login("alice", "w").await.unwrap_err().code,
        ErrorCode::TooManyRequests,
        "a remembered login does not unblock the name for guesses"
    );
    // A name longer than any user's is wrong at once: nothing hashed, nothing tracked.
    let long = "n".repeat(MAX_LOGIN_NAME_BYTES + 1);
    assert!(a.login(&long, "x").await.unwrap().is_none());
    assert!(a.failures.lock_len() <= 1);
}

/// A busy client's remembered login does not clear the guesses made under its name in
/// between: before, each of its requests reset the count, so a guesser interleaving with it
/// was never blocked.
#[tokio::test]
async fn a_remembered_login_does_not_reset_the_guesses() {
    let (a, _d) = authority();
    assert!(a.login("alice", "a").await.unwrap().is_some());
    for guess in ["x", "y"] {
        assert!(a.login("alice", guess).await.unwrap().is_none());
        assert!(a.login("alice", "a").await.unwrap().is_some(), "the real client goes on");
    }
    assert_eq!(a.login("alice", "z").await.unwrap_err().code, ErrorCode::TooManyRequests);
    assert!(a.login("alice", "a").await.unwrap().is_some(), "the remembered login still goes on");
}

/// A login whose client hangs up while its password is hashed keeps its check's slot until
/// the hash ends: the hash runs on. Before, the slot came free at once, so clients that
/// closed each connection right after sending made-up credentials had argon2 hashes (19 MiB
/// each) running without limit on the blocking pool the storage also uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_dropped_while_its_hash_runs_keeps_its_slot() {
    let (a, _d) = authority();
    let a = Arc::new(a);
    let logins: Vec<_> = (0..2 * MAX_PASSWORD_CHECKS)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move { a.login(&format!("made-up {i}"), "x").await })
        })
        .collect();
    // Every slot taken, hashes running.
    let started = Instant::now();
    while a.checks.available_permits() > 0 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for login in &logins {
        login.abort();
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(a.checks.available_permits(), 0, "dropped logins freed their slots while hashing");
    // The hashes end, their slots come back, and their failures were counted.
    while a.checks.available_permits() < MAX_PASSWORD_CHECKS {
        assert!(started.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A wrong password for a user with a SHA-256 password takes about as long as one for a name
/// that does not exist (which is checked against an argon2 decoy): the times do not tell the
/// names. Before, the SHA-256 user's answer came thousands of times sooner.
#[tokio::test]
async fn a_quick_hash_user_answers_as_slowly_as_an_unknown_name() {
    let dir = tempfile_dir::Dir::new();
    let mut cfg = config();
    cfg.users[0].password = None;
    cfg.users[0].password_sha256 = Some(crate::auth::users::sha256_hex("right"));
    cfg.login_failures = 100;
    let a = Authority::new(cfg, &dir.0, &[]).unwrap();
    let time = |name: &'static str| {
        let a = &a;
        async move {
            let started = Instant::now();
            assert!(a.login(name, "wrong").await.unwrap().is_none());
            started.elapsed()
        }
    };
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        known.push(time("alice").await);
        unknown.push(time("nobody").await);
    }
    let (known, unknown) = (known.iter().min().unwrap(), unknown.iter().min().unwrap());
    assert!(
        known.as_secs_f64() > 0.3 * unknown.as_secs_f64(),
        "a SHA-256 user {known:?}, an unknown name {unknown:?}"
    );
    // The right password still logs in, and is then remembered.
    assert!(a.login("alice", "right").await.unwrap().is_some());
    let started = Instant::now();
    assert!(a.login("alice", "right").await.unwrap().is_some());
    assert!(started.elapsed() < *unknown / 10, "a remembered login is quick: {:?}", started.elapsed());
}

/// A burst of concurrent wrong guesses for one name gets about as many password checks as
/// guesses one after the other would (the failure limit, plus the checks that run at once:
/// every slow check, a made-up name's decoy too, takes one of `MAX_PASSWORD_CHECKS`). Before,
/// every guess of a burst was checked at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_guesses_get_no_more_checks_than_sequential_ones() {
    let dir = tempfile_dir::Dir::new();
    let mut cfg = config();
    cfg.users[0].password = None;
    cfg.users[0].password_argon2 = Some(crate::auth::users::hash_password("right").unwrap());
    let a = Arc::new(Authority::new(cfg, &dir.0, &[]).unwrap());
    let guesses = (0..24).map(|i| {
        let a = a.clone();
        tokio::spawn(async move { a.login("alice", &format!("guess {i}")).await })
    });
    let mut checked = 0;
    for g in futures_util::future::join_all(guesses).await {
        match g.unwrap() {
            Ok(None) => checked += 1,
            Ok(Some(_)) => panic!("a wrong guess logged in"),
            Err(e) => assert_eq!(e.code, ErrorCode::TooManyRequests),
        }
    }
    // `login_failures` is 2 here.
    assert!(checked < 2 + MAX_PASSWORD_CHECKS, "{checked} of 24 concurrent guesses were checked");
    assert!(a.login("alice", "right").await.is_err(), "the name is blocked for the window");
}

#[tokio::test]
async fn node_identity_pulls_everything_but_pushes_nothing() {
    let (a, _d) = authority();
    let id = TransportIdentity { name: "n1".into(), role: crate::identity::Role::Agent };
    let headers = HeaderMap::new();
    let pull = [Need::Repo("priv/app".into(), Action::Pull)];
    let check = AccessCheck { headers: &headers, identity: Some(&id), needs: &pull };
    assert_eq!(a.authorize(&check).await.unwrap(), Principal::Node("n1".into()));
    let push = [Need::Repo("priv/app".into(), Action::Push)];
    let check = AccessCheck { headers: &headers, identity: Some(&id), needs: &push };
    assert!(a.authorize(&check).await.is_err());
    assert!(a.node_api_allows(&headers, Some(&id), Some("any/repo")));
}

#[test]
fn a_token_request_is_granted_at_most_its_cap_of_scopes() {
    let many: String = (0..10_000).map(|i| format!("repository:pub/r{i}:pull")).collect::<Vec<_>>().join(" ");
    let pairs = vec![("scope".to_string(), many), ("scope".to_string(), "registry:catalog:*".to_string())];
    let scopes = scopes_of(&pairs);
    assert_eq!(scopes.len(), MAX_TOKEN_SCOPES);
    assert_eq!(scopes[0], Scope::Repository { name: "pub/r0".into(), actions: vec![Action::Pull] });
}

/// The node API takes every cluster secret still accepted (the current one, and the old one
/// during a rotation), and nothing else, from a caller without a node certificate.
#[test]
fn the_node_api_takes_every_accepted_cluster_secret() {
    let dir = tempfile_dir::Dir::new();
    let secrets = ["new-secret".to_string(), "old-secret".to_string()];
    let a = Authority::new(config(), &dir.0, &secrets).unwrap();
    let with = |token: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        a.node_api_allows(&headers, None, Some("any/repo"))
    };
    assert!(with("new-secret"));
    assert!(with("old-secret"), "a rotation's old secret still works");
    // Access control off: anyone may call, but only the secret (or a node certificate) makes
    // a node (which may ask an origin to fetch an upstream blob itself).
    let open = Authority::new(AuthConfig::default(), &dir.0, &secrets).unwrap();
    assert!(!open.enabled());
    assert_eq!(
        open.node_api_caller(&HeaderMap::new(), None, Some("any/repo"), false),
        Some(NodeApiCaller::Client)
    );
    let mut secret = HeaderMap::new();
    secret.insert(header::AUTHORIZATION, "Bearer new-secret".parse().unwrap());
    assert_eq!(open.node_api_caller(&secret, None, None, true), Some(NodeApiCaller::Node));
    assert!(!with("another-secret"));
    assert!(!a.node_api_allows(&HeaderMap::new(), None, Some("any/repo")));
}
