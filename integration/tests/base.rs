//! The API version check, health endpoint and response-wide rules (Warning).

use shoal_integration::api::ImageKind;
use shoal_integration::{skip_if_external, unique_repo, Origin, Reply, SendExt, StatusCode};

/// end-1: `GET /v2/` answers 200, with the legacy
/// `Docker-Distribution-API-Version: registry/2.0` header clients look for.
#[tokio::test]
async fn api_version_check_returns_200_with_api_version_header() {
    let origin = Origin::start().await;
    let reply = origin.client().get("/v2/").reply().await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.must_header("docker-distribution-api-version"), "registry/2.0");
}

/// `GET /v2` without the trailing slash is the same endpoint to clients; it
/// must not 404 (it may redirect).
#[tokio::test]
async fn api_version_check_without_trailing_slash_is_not_404() {
    let origin = Origin::start().await;
    let reply = origin.client().get("/v2").reply().await;
    assert!(reply.status.is_success() || reply.status.is_redirection(), "{}", reply.describe());
}

/// Shoal: `GET /healthz` answers 200 (DESIGN: every server answers it).
#[tokio::test]
async fn healthz_returns_200() {
    skip_if_external!("/healthz is Shoal's");
    let origin = Origin::start().await;
    origin.client().get("/healthz").reply().await.expect(StatusCode::OK);
}

/// Warnings: any `Warning` header uses warn-code 299 and warn-agent `-`,
/// has no warn-date, and all of them together stay within 4096 bytes.
#[tokio::test]
async fn warning_headers_are_well_formed() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("warnings");
    let image = client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;
    let replies = vec![
        client.get("/v2/").reply().await,
        client.get_manifest(&repo, "v1").await,
        client.get_blob(&repo, &image.layers[0].digest).await,
        client.get_manifest(&repo, "missing").await,
        client.tags(&repo, "").await,
    ];
    for reply in &replies {
        check_warnings(reply);
    }
}

fn check_warnings(reply: &Reply) {
    let warnings = reply.header_all("warning");
    let total: usize = warnings.iter().map(|w| w.len()).sum();
    assert!(total <= 4096, "over 4096 bytes of warnings: {}", reply.describe());
    for warning in warnings {
        let mut parts = warning.splitn(3, ' ');
        assert_eq!(parts.next(), Some("299"), "warn-code in {warning:?}");
        assert_eq!(parts.next(), Some("-"), "warn-agent in {warning:?}");
        let text = parts.next().unwrap_or_default();
        assert!(
            text.starts_with('"') && text.ends_with('"') && text.len() >= 2,
            "warn-text must be one quoted string and no warn-date: {warning:?}"
        );
    }
}
