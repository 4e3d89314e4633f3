//! Docker token auth on the origin (issue 12 part 3) and private images on agents (part 4):
//! the `/token` endpoint, the spec's refusals for missing, expired, tampered, wrong-scope and
//! wrong-key tokens, per-repository rules, anonymous pull per pattern, rate-limited logins,
//! the published keys, and an agent that verifies tokens itself, also for what it cached.

use shoal_integration::api::{Client, ImageKind};
use shoal_integration::cluster::Cluster;
use shoal_integration::{skip_if_external, unique_repo, Origin, SendExt, StatusCode};
use shoal_registry::auth::tokens::{now_secs, Claims, ResourceActions, SigningKey};

/// Rules by pattern: `private-*` readable by alice, written by ci; `public-*` readable by
/// anyone. ci's password is an argon2 hash, as `shoal passwd` prints.
fn auth_toml() -> String {
    let ci_hash = shoal_registry::auth::hash_password("ci-pass").expect("hash a password");
    format!(
        r#"
[auth]
tokens = true
users = [
  {{ name = "alice", password = "alice-pass", access = "none" }},
  {{ name = "ci", password_argon2 = "{ci_hash}", access = "none" }},
  {{ name = "mallory", password = "m", access = "none" }},
]
[[auth.rules]]
repositories = "conformance/private-*"
pull = ["alice"]
push = ["ci"]
delete = ["ci"]
[[auth.rules]]
repositories = "conformance/public-*"
push = ["ci"]
anonymous_pull = true
"#
    )
}

/// A token from `origin`'s `/token` for `scope`, as `user` (None: anonymous).
async fn token(origin: &str, user: Option<(&str, &str)>, scope: &str) -> String {
    let http = reqwest::Client::new();
    let mut req = http.get(format!("{origin}/token")).query(&[("service", "shoal"), ("scope", scope)]);
    if let Some((u, p)) = user {
        req = req.basic_auth(u, Some(p));
    }
    let reply = req.send().await.expect("token request");
    assert_eq!(reply.status(), StatusCode::OK, "token for {user:?} {scope}");
    let body: serde_json::Value = reply.json().await.expect("token JSON");
    for field in ["token", "access_token", "expires_in", "issued_at"] {
        assert!(body.get(field).is_some(), "no {field} in {body}");
    }
    body["token"].as_str().expect("token string").to_string()
}

fn claims(repo: &str, actions: &[&str], exp_in: i64) -> Claims {
    let now = now_secs();
    Claims {
        iss: "shoal".into(),
        sub: "alice".into(),
        aud: "shoal".into(),
        exp: (now as i64 + exp_in) as u64,
        nbf: now - 1,
        iat: now - 1,
        jti: "test".into(),
        access: vec![ResourceActions {
            kind: "repository".into(),
            name: repo.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }],
    }
}

/// The origin's own signing key, read from its data directory.
fn origin_key(origin: &Origin) -> SigningKey {
    let pem = std::fs::read_to_string(origin.data_dir().join("auth/token-key.pem")).expect("origin key file");
    SigningKey::from_pem(&pem).expect("parse the origin's key")
}

fn assert_bearer_refusal(reply: &shoal_integration::api::Reply, error: Option<&str>) {
    if reply.method == shoal_integration::Method::HEAD {
        reply.expect(StatusCode::UNAUTHORIZED); // no body to carry the code
    } else {
        reply.expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    }
    let challenge = reply.must_header("www-authenticate");
    assert!(challenge.starts_with("Bearer realm=\"http://"), "challenge {challenge:?}");
    assert!(challenge.contains("service=\"shoal\""), "challenge {challenge:?}");
    if let Some(e) = error {
        assert!(challenge.contains(&format!("error=\"{e}\"")), "challenge {challenge:?}");
    }
}

#[tokio::test]
async fn token_flow_refuses_missing_expired_tampered_wrong_scope_and_wrong_key_tokens() {
    skip_if_external!("needs a Shoal config");
    let origin = Origin::start_with_config(&auth_toml()).await;
    let url = origin.url().to_string();
    let repo = unique_repo("private");
    let ci = origin
        .client()
        .with_bearer(&token(&url, Some(("ci", "ci-pass")), &format!("repository:{repo}:pull,push")).await);
    let image = ci.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;

    // Missing: 401 with the challenge that names realm, service and scope.
    let anonymous = origin.client();
    let reply = anonymous.get_manifest(&repo, "v1").await;
    assert_bearer_refusal(&reply, None);
    let challenge = reply.must_header("www-authenticate");
    assert!(challenge.contains(&format!("realm=\"{url}/token\"")), "{challenge}");
    assert!(challenge.contains(&format!("scope=\"repository:{repo}:pull\"")), "{challenge}");
    // `/v2/` challenges too, so clients discover the realm.
    assert_bearer_refusal(&anonymous.get("/v2/").reply().await, None);

    // A good token works.
    let alice_token = token(&url, Some(("alice", "alice-pass")), &format!("repository:{repo}:pull")).await;
    let alice = origin.client().with_bearer(&alice_token);
    alice.get_manifest(&repo, "v1").await.expect(StatusCode::OK);
    alice.get("/v2/").reply().await.expect(StatusCode::OK);

    // Wrong scope: a token for another repository.
    let other = token(&url, Some(("alice", "alice-pass")), &format!("repository:{repo}-other:pull")).await;
    assert_bearer_refusal(
        &origin.client().with_bearer(&other).get_manifest(&repo, "v1").await,
        Some("insufficient_scope"),
    );

    // Expired, signed by the origin's own key.
    let key = origin_key(&origin);
    let expired = key.sign(&claims(&repo, &["pull"], -120)).unwrap();
    assert_bearer_refusal(
        &origin.client().with_bearer(&expired).get_manifest(&repo, "v1").await,
        Some("invalid_token"),
    );

    // Tampered: alice's token with its claims widened to push, signature kept.
    let parts: Vec<&str> = alice_token.split('.').collect();
    use base64::Engine as _;
    let widened = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&claims(&repo, &["pull", "push", "delete"], 300)).unwrap());
    let tampered = format!("{}.{}.{}", parts[0], widened, parts[2]);
    let t = origin.client().with_bearer(&tampered);
    assert_bearer_refusal(&t.get_manifest(&repo, "v1").await, Some("invalid_token"));
    assert_bearer_refusal(
        &t.delete(&format!("/v2/{repo}/manifests/{}", image.manifest.digest)).reply().await,
        Some("invalid_token"),
    );

    // Wrong key: a well-formed token signed by a key the origin never published.
    let (stranger, _) = SigningKey::generate().unwrap();
    let foreign = stranger.sign(&claims(&repo, &["pull"], 300)).unwrap();
    assert_bearer_refusal(
        &origin.client().with_bearer(&foreign).get_manifest(&repo, "v1").await,
        Some("invalid_token"),
    );

    // Garbage in the header.
    assert_bearer_refusal(
        &origin.client().with_bearer("not.a.jwt").get_manifest(&repo, "v1").await,
        Some("invalid_token"),
    );

    // The request log names the principal.
    let log = std::fs::read_to_string(origin.log_path()).unwrap_or_default();
    assert!(log.contains("principal=alice"), "no principal=alice in the origin's request log");
    assert!(log.contains("principal=ci"), "no principal=ci in the origin's request log");
}

#[tokio::test]
async fn pull_only_user_cannot_push_or_delete() {
    skip_if_external!("needs a Shoal config");
    let origin = Origin::start_with_config(&auth_toml()).await;
    let url = origin.url().to_string();
    let repo = unique_repo("private");
    let ci = origin
        .client()
        .with_bearer(&token(&url, Some(("ci", "ci-pass")), &format!("repository:{repo}:pull,push")).await);
    let image = ci.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;

    // alice asks for everything; the token server grants only what the rules allow (pull).
    let wide =
        token(&url, Some(("alice", "alice-pass")), &format!("repository:{repo}:pull,push,delete")).await;
    let alice = origin.client().with_bearer(&wide);
    alice.get_manifest(&repo, "v1").await.expect(StatusCode::OK);
    let push = alice.post(&format!("/v2/{repo}/blobs/uploads/")).header("content-length", "0").reply().await;
    assert_bearer_refusal(&push, Some("insufficient_scope"));
    let delete = alice.delete(&format!("/v2/{repo}/manifests/{}", image.manifest.digest)).reply().await;
    assert_bearer_refusal(&delete, Some("insufficient_scope"));
    let put = alice.put_manifest(&repo, "v2", &image.manifest).await;
    assert_bearer_refusal(&put, Some("insufficient_scope"));

    // The same with Basic credentials: a known user without the right is 403 DENIED.
    let basic = origin.client().with_basic_auth("alice", "alice-pass");
    basic.get_manifest(&repo, "v1").await.expect(StatusCode::OK);
    basic
        .post(&format!("/v2/{repo}/blobs/uploads/"))
        .header("content-length", "0")
        .reply()
        .await
        .expect_error(StatusCode::FORBIDDEN, "DENIED");
    basic
        .delete(&format!("/v2/{repo}/manifests/{}", image.manifest.digest))
        .reply()
        .await
        .expect_error(StatusCode::FORBIDDEN, "DENIED");

    // ci may delete.
    let ci_del = token(&url, Some(("ci", "ci-pass")), &format!("repository:{repo}:delete")).await;
    origin
        .client()
        .with_bearer(&ci_del)
        .delete(&format!("/v2/{repo}/manifests/{}", image.manifest.digest))
        .reply()
        .await
        .expect(StatusCode::ACCEPTED);
}

#[tokio::test]
async fn anonymous_pull_of_public_pattern_works_private_refused() {
    skip_if_external!("needs a Shoal config");
    let origin = Origin::start_with_config(&auth_toml()).await;
    let url = origin.url().to_string();
    let public = unique_repo("public");
    let private = unique_repo("private");
    let scope = format!("repository:{public}:pull,push repository:{private}:pull,push");
    let ci = origin.client().with_bearer(&token(&url, Some(("ci", "ci-pass")), &scope).await);
    ci.push_image(&public, ImageKind::Oci, Some("v1"), 64).await;
    ci.push_image(&private, ImageKind::Oci, Some("v1"), 64).await;

    let anonymous = origin.client();
    anonymous.get_manifest(&public, "v1").await.expect(StatusCode::OK);
    assert_bearer_refusal(&anonymous.get_manifest(&private, "v1").await, None);
    // An anonymous token carries anonymous rights: the public pull, not the private one.
    let anon = token(&url, None, &format!("repository:{public}:pull repository:{private}:pull")).await;
    let anon = origin.client().with_bearer(&anon);
    anon.get_manifest(&public, "v1").await.expect(StatusCode::OK);
    assert_bearer_refusal(&anon.get_manifest(&private, "v1").await, Some("insufficient_scope"));
    // The catalog shows each client only what it may pull.
    let names = |reply: shoal_integration::api::Reply| -> Vec<String> {
        reply.expect(StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        v["repositories"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect()
    };
    let seen = names(anonymous.get("/v2/_catalog?n=1000").reply().await);
    assert!(seen.contains(&public) && !seen.contains(&private), "anonymous catalog: {seen:?}");
    // A page at a time, the links name no hidden repository either (they named the store's
    // last name, seen or not, so following them told every private name).
    let (mut path, mut walked) = ("/v2/_catalog?n=1".to_string(), Vec::new());
    for _ in 0..100 {
        let reply = anonymous.get(&path).reply().await;
        let link = reply.header("link").map(str::to_string);
        walked.extend(names(reply));
        let Some(link) = link else { break };
        assert!(!link.contains(&private), "a catalog link names a private repository: {link}");
        path = link.trim_start_matches('<').split('>').next().unwrap().to_string();
    }
    assert_eq!(walked, seen, "the pages make the whole visible catalog");
    let alice = origin.client().with_basic_auth("alice", "alice-pass");
    let seen = names(alice.get("/v2/_catalog?n=1000").reply().await);
    assert!(seen.contains(&public) && seen.contains(&private), "alice's catalog: {seen:?}");
    // Anonymous clients cannot push to the public pattern.
    let push =
        anonymous.post(&format!("/v2/{public}/blobs/uploads/")).header("content-length", "0").reply().await;
    assert_bearer_refusal(&push, None);
}

#[tokio::test]
async fn token_endpoint_password_grant_rate_limit_and_published_keys() {
    skip_if_external!("needs a Shoal config");
    let origin = Origin::start_with_config(&auth_toml()).await;
    let url = origin.url().to_string();
    let http = reqwest::Client::new();
    let repo = unique_repo("private");

    // containerd's OAuth form.
    let form = [
        ("grant_type", "password"),
        ("username", "alice"),
        ("password", "alice-pass"),
        ("service", "shoal"),
        ("client_id", "test"),
        ("scope", &format!("repository:{repo}:pull")),
    ];
    let reply = http.post(format!("{url}/token")).form(&form).send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert!(body["access_token"].as_str().is_some_and(|t| t.split('.').count() == 3));

    // Wrong passwords: 401, then 429 once the name used up its attempts (5 by default). The
    // same wrong password again is not another guess (a client's POST-then-GET of one login).
    for i in 0..5 {
        // The fifth is the last the name may make: sent once.
        for _ in 0..if i < 4 { 2 } else { 1 } {
            let r = http
                .get(format!("{url}/token"))
                .basic_auth("mallory", Some(format!("guess {i}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        }
    }
    let r = http.get(format!("{url}/token")).basic_auth("mallory", Some("m")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "the right password is refused while locked out");
    // Other users are not affected.
    token(&url, Some(("alice", "alice-pass")), &format!("repository:{repo}:pull")).await;

    // Published: keys, absolute realm, rules without user names; no credentials needed.
    let published: serde_json::Value =
        http.get(format!("{url}/shoal/v1/auth")).send().await.unwrap().json().await.unwrap();
    assert_eq!(published["enabled"], true);
    assert_eq!(published["policy"]["realm"], format!("{url}/token"));
    assert_eq!(published["keys"][0]["kid"], origin_key(&origin).public.kid);
    assert!(!published.to_string().contains("alice"), "user names published: {published}");

    // The node API needs a node identity, the cluster secret or a token, except for what an
    // anonymous client may read: metainfo (anonymous pull is allowed for `public-*`), not the
    // pull-through routes of a private repository.
    let digest = shoal_integration::sha256(b"x");
    let metainfo = format!("{url}/shoal/v1/blobs/{digest}/metainfo");
    assert_eq!(http.get(&metainfo).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    let upstream = format!("{url}/shoal/v1/upstream/blobs/{digest}");
    let anonymous = http.get(&upstream).query(&[("repo", "conformance/private-other")]).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let t = token(&url, Some(("alice", "alice-pass")), &format!("repository:{repo}:pull")).await;
    assert_eq!(http.get(&metainfo).bearer_auth(&t).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    // Acting for a repository (pull-through's fetch progress and byte stream), the token must
    // grant pull there: any token used to start fetches of any upstream repository and read
    // their bytes, whatever `[auth]` says of it.
    for route in ["", "/stream"] {
        let upstream = format!("{url}/shoal/v1/upstream/blobs/{digest}{route}");
        for other in ["docker.io/acme/secret", "conformance/private-other"] {
            let r = http.get(&upstream).query(&[("repo", other)]).bearer_auth(&t).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{route} for {other} with a token for {repo}");
        }
        let r = http.get(&upstream).query(&[("repo", repo.as_str())]).bearer_auth(&t).send().await.unwrap();
        assert_ne!(r.status(), StatusCode::UNAUTHORIZED, "{route} for {repo} with its token");
    }
}

/// With tokens on and no repository an anonymous client may pull, the node API refuses
/// requests without credentials, but the list of upstream registries is for anyone: agents
/// without a node certificate ask for it with none, and behind the guard they never learnt
/// it (every mirrored name then failed on them).
#[tokio::test]
async fn the_upstream_registries_need_no_credentials() {
    skip_if_external!("needs a Shoal config");
    let config = r#"
[auth]
tokens = true
users = [{ name = "alice", password = "alice-pass", access = "none" }]
[[auth.rules]]
repositories = "conformance/private-*"
pull = ["alice"]
[[upstream]]
registry = "docker.io"
url = "http://127.0.0.1:9"
"#;
    let origin = Origin::start_with_config(config).await;
    let url = origin.url().to_string();
    let http = reqwest::Client::new();
    let metainfo = format!("{url}/shoal/v1/blobs/{}/metainfo", shoal_integration::sha256(b"x"));
    assert_eq!(http.get(&metainfo).send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let listed = http.get(format!("{url}/shoal/v1/upstream/registries")).send().await.unwrap();
    assert_eq!(listed.status(), StatusCode::OK);
    let listed: serde_json::Value = listed.json().await.unwrap();
    assert_eq!(listed["registries"], serde_json::json!(["docker.io"]));
}

/// With Shoal's tokens on, a client cannot send credentials for an upstream (its
/// `Authorization` is Shoal's), so an upstream repository that refuses the origins' own is
/// answered 403 `DENIED` saying what would open it. Before, the origin sent a `Basic`
/// challenge for the upstream that no client could meet: Docker sent Shoal's password back
/// and was refused again.
#[tokio::test]
async fn a_private_upstream_repository_under_shoal_tokens_is_denied_not_challenged() {
    skip_if_external!("needs a Shoal config");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that refuses every request without credentials.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"up\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    let config = format!(
        r#"
[auth]
tokens = true
users = [{{ name = "alice", password = "alice-pass", access = "none" }}]
[[auth.rules]]
repositories = "up.test/*"
pull = ["alice"]
[[upstream]]
registry = "up.test"
url = "{upstream}"
"#
    );
    let origin = Origin::start_with_config(&config).await;
    let url = origin.url().to_string();
    let t = token(&url, Some(("alice", "alice-pass")), "repository:up.test/team/app:pull").await;
    let http = reqwest::Client::new();
    let r = http.get(format!("{url}/v2/up.test/team/app/manifests/v1")).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.headers().get("www-authenticate").is_none(), "{:?}", r.headers());
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED", "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("up.test") && message.contains("password_file"), "{message}");
}

/// A private image pulled through an agent once with a token stays private there: the agent
/// answers 401 with the origin's realm to anonymous clients and to tokens without the scope,
/// for the manifest and for the blobs it has cached, and a public repository's name does not
/// unlock a private blob.
#[tokio::test]
async fn private_image_on_an_agent_stays_private() {
    skip_if_external!("starts its own cluster");
    let mut cluster = Cluster::start_with_origin(1, &auth_toml(), "").await;
    let url = cluster.origin.url().to_string();
    let private = unique_repo("private");
    let public = unique_repo("public");
    let scope = format!("repository:{private}:pull,push repository:{public}:pull,push");
    let ci = cluster.origin.client().with_bearer(&token(&url, Some(("ci", "ci-pass")), &scope).await);
    let image = ci.push_image(&private, ImageKind::Oci, Some("v1"), 300_000).await;
    let public_image = ci.push_image(&public, ImageKind::Oci, Some("v1"), 1000).await;
    let layer = &image.layers[0];

    let agent = Client::new(&cluster.agent_url(0));
    // Anonymous: 401 pointing at the origin's token endpoint.
    let reply = agent.get_manifest(&private, "v1").await;
    assert_bearer_refusal(&reply, None);
    assert!(reply.must_header("www-authenticate").contains(&format!("realm=\"{url}/token\"")));

    // One authorized pull caches the image on the agent.
    let alice_token = token(&url, Some(("alice", "alice-pass")), &format!("repository:{private}:pull")).await;
    let alice = agent.with_bearer(&alice_token);
    let m = alice.get_manifest(&private, "v1").await;
    m.expect(StatusCode::OK);
    assert_eq!(m.body, image.manifest.bytes);
    let b = alice.get_blob(&private, &layer.digest).await;
    b.expect(StatusCode::OK);
    assert_eq!(b.body, layer.data, "the private layer through the agent");

    // Then: anonymous and a token without the scope are refused, manifest and cached blob.
    let other = token(&url, Some(("alice", "alice-pass")), &format!("repository:{public}:pull")).await;
    for client in [agent.clone(), agent.with_bearer(&other)] {
        assert_bearer_refusal(&client.get_manifest(&private, "v1").await, None);
        assert_bearer_refusal(&client.get_manifest(&private, &image.manifest.digest).await, None);
        assert_bearer_refusal(&client.get_blob(&private, &layer.digest).await, None);
        assert_bearer_refusal(&client.head_blob(&private, &layer.digest).await, None);
    }
    // Forged and expired tokens too, checked by the agent with the origin's published keys.
    let (stranger, _) = SigningKey::generate().unwrap();
    let foreign = stranger.sign(&claims(&private, &["pull"], 300)).unwrap();
    assert_bearer_refusal(
        &agent.with_bearer(&foreign).get_blob(&private, &layer.digest).await,
        Some("invalid_token"),
    );
    let expired = origin_key(&cluster.origin).sign(&claims(&private, &["pull"], -120)).unwrap();
    assert_bearer_refusal(
        &agent.with_bearer(&expired).get_blob(&private, &layer.digest).await,
        Some("invalid_token"),
    );

    // A public repository's name does not unlock the private blob the agent has cached.
    let through_public = agent.get_blob(&public, &layer.digest).await;
    assert_eq!(through_public.status, StatusCode::NOT_FOUND, "{}", through_public.describe());
    // The public image itself is served anonymously.
    agent.get_manifest(&public, "v1").await.expect(StatusCode::OK);
    let pb = agent.get_blob(&public, &public_image.layers[0].digest).await;
    pb.expect(StatusCode::OK);
    assert_eq!(pb.body, public_image.layers[0].data);

    // Preheat needs the same authorization.
    let http = reqwest::Client::new();
    let body = serde_json::json!({ "image": format!("{private}:v1") });
    let preheat = format!("{}/v1/preheat", cluster.agent_url(0));
    let r = http.post(&preheat).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = http.post(&preheat).bearer_auth(&other).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = http.post(&preheat).bearer_auth(&alice_token).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(text.contains("\"done\""), "preheat stream: {text}");

    // The agent decides alone: with the origin down, the cached private manifest (by digest)
    // and blob still go to the token holder and still not to anyone else.
    let key = origin_key(&cluster.origin);
    cluster.origin.kill();
    alice.get_manifest(&private, &image.manifest.digest).await.expect(StatusCode::OK);
    let b = alice.get_blob(&private, &layer.digest).await;
    b.expect(StatusCode::OK);
    assert_eq!(b.body, layer.data, "the cached private layer with the origin down");
    assert_bearer_refusal(&agent.get_blob(&private, &layer.digest).await, None);
    assert_bearer_refusal(&agent.with_bearer(&other).get_blob(&private, &layer.digest).await, None);
    // A fresh token signed by the origin's key (issued before it went down) is enough.
    let fresh = key.sign(&claims(&private, &["pull"], 120)).unwrap();
    agent.with_bearer(&fresh).get_blob(&private, &layer.digest).await.expect(StatusCode::OK);
    // And a public repository's name still does not unlock the private blob: unconfirmed
    // pairs are not served from the cache while the origin is unreachable.
    let r = agent.get_blob(&public, &layer.digest).await;
    assert_ne!(r.status, StatusCode::OK, "{}", r.describe());
}

/// Origins of a cluster that each generated their own key accept each other's tokens: a
/// client gets its token from one origin and its next request lands on another.
#[tokio::test]
async fn origins_accept_each_others_tokens() {
    skip_if_external!("starts its own origins");
    use shoal_integration::origins::{ClusterSpec, OriginCluster};
    let cluster = OriginCluster::start_cluster(ClusterSpec::new(2).cluster(&auth_toml())).await;
    let repo = unique_repo("private");
    let scope = format!("repository:{repo}:pull,push");
    let from_first = token(&cluster.url(0), Some(("ci", "ci-pass")), &scope).await;
    let image =
        cluster.client(1).with_bearer(&from_first).push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;
    let pull =
        token(&cluster.url(1), Some(("alice", "alice-pass")), &format!("repository:{repo}:pull")).await;
    let m = cluster.client(0).with_bearer(&pull).get_manifest(&repo, "v1").await;
    m.expect(StatusCode::OK);
    assert_eq!(m.body, image.manifest.bytes);
    // A key no origin published is still refused.
    let (stranger, _) = SigningKey::generate().unwrap();
    let foreign = stranger.sign(&claims(&repo, &["pull"], 300)).unwrap();
    assert_bearer_refusal(
        &cluster.client(0).with_bearer(&foreign).get_manifest(&repo, "v1").await,
        Some("invalid_token"),
    );
}

/// A private blob an agent has cached goes bad on disk; the next read, with a valid token,
/// finds the bad piece while streaming and goes on from a new download. That download runs
/// after the request's handler returned: it must still carry the client's token, or the
/// origins refuse its HTTP fallback (the tracker is down here, so the fallback is all there
/// is) and the client's stream breaks. Before, it broke.
#[tokio::test]
async fn a_bad_cached_private_blob_is_fetched_again_with_the_clients_token() {
    skip_if_external!("starts its own cluster");
    let mut cluster = Cluster::start_with_origin(1, &auth_toml(), "").await;
    let url = cluster.origin.url().to_string();
    let private = unique_repo("private");
    let pull = format!("repository:{private}:pull");
    let alice = Client::new(&cluster.agent_url(0))
        .with_bearer(&token(&url, Some(("alice", "alice-pass")), &pull).await);
    read_a_cached_blob_gone_bad(&mut cluster, &private, &alice).await;
}

/// The same for an anonymous client of a public repository: the agent (plain HTTP, no node
/// certificate) shows the origins an anonymous token for it, and the new download must get
/// one too. Before, it went without and the origins refused its fallback.
#[tokio::test]
async fn a_bad_cached_public_blob_is_fetched_again_for_an_anonymous_client() {
    skip_if_external!("starts its own cluster");
    let mut cluster = Cluster::start_with_origin(1, &auth_toml(), "").await;
    let public = unique_repo("public");
    let anonymous = Client::new(&cluster.agent_url(0));
    read_a_cached_blob_gone_bad(&mut cluster, &public, &anonymous).await;
}

/// Pushes an image to `repo`, reads its first layer through agent 0 as `reader`, flips bytes
/// of the cached copy's third MiB, stops the tracker, and reads it again in full.
async fn read_a_cached_blob_gone_bad(cluster: &mut Cluster, repo: &str, reader: &Client) {
    let url = cluster.origin.url().to_string();
    let scope = format!("repository:{repo}:pull,push");
    let ci = cluster.origin.client().with_bearer(&token(&url, Some(("ci", "ci-pass")), &scope).await);
    let image = ci.push_image(repo, ImageKind::Oci, Some("v1"), 3 << 20).await;
    let layer = &image.layers[0];
    let first = reader.get_blob(repo, &layer.digest).await;
    first.expect(StatusCode::OK);
    assert_eq!(first.body, layer.data);

    let hex = layer.digest.trim_start_matches("sha256:");
    let cached = cluster.agent_data_dir(0).join("cache").join("sha256").join(hex);
    for _ in 0..100 {
        if cached.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&cached).expect("the cached blob");
        let offset = (2 << 20) + 11;
        let mut buf = [0u8; 8];
        file.read_exact_at(&mut buf, offset).unwrap();
        for b in &mut buf {
            *b ^= 0x5a;
        }
        file.write_all_at(&buf, offset).unwrap();
    }
    cluster.kill_tracker();
    let again = reader.get_blob(repo, &layer.digest).await;
    again.expect(StatusCode::OK);
    assert!(again.body == layer.data, "the blob read again after its cached copy went bad");
}
