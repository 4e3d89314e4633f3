//! What every Shoal HTTP server has around its API: `/healthz`, `/readyz`, `/metrics`, one log
//! line per request, and request counts, latencies and bytes in Prometheus.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use prometheus::{Encoder, HistogramVec, IntCounter, IntCounterVec, Registry, TextEncoder};

use crate::http_server::HttpLimits;
use crate::readiness::Readiness;

/// `shoal_<component>_tls_certificate_expiry_timestamp_seconds`: when the certificate this
/// process serves and presents stops being valid, read at each scrape (a reload shows at
/// once); absent without one. The chart alerts a week before.
struct CertificateExpiry {
    name: String,
    desc: prometheus::core::Desc,
}

const CERTIFICATE_EXPIRY_HELP: &str =
    "When the TLS certificate in use stops being valid (seconds since the epoch)";

impl CertificateExpiry {
    fn new(component: &str) -> prometheus::Result<CertificateExpiry> {
        let name = format!("shoal_{component}_tls_certificate_expiry_timestamp_seconds");
        let desc = prometheus::core::Desc::new(
            name.clone(),
            CERTIFICATE_EXPIRY_HELP.into(),
            Vec::new(),
            std::collections::HashMap::new(),
        )?;
        Ok(CertificateExpiry { name, desc })
    }
}

impl prometheus::core::Collector for CertificateExpiry {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Some(until) = shoal_tls::current().certificate_expires() else { return Vec::new() };
        let secs = until.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        match prometheus::Gauge::new(self.name.clone(), CERTIFICATE_EXPIRY_HELP) {
            Ok(gauge) => {
                gauge.set(secs);
                prometheus::core::Collector::collect(&gauge)
            }
            Err(_) => Vec::new(),
        }
    }
}

/// HTTP metrics of one component, named `shoal_<component>_http_*`.
#[derive(Clone)]
pub struct HttpMetrics {
    pub registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    bytes_in: IntCounter,
    bytes_out: IntCounter,
}

impl HttpMetrics {
    pub fn new(component: &str) -> anyhow::Result<HttpMetrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            prometheus::Opts::new(
                format!("shoal_{component}_http_requests_total"),
                "HTTP requests by method and status",
            ),
            &["method", "status"],
        )?;
        let duration = HistogramVec::new(
            prometheus::HistogramOpts::new(
                format!("shoal_{component}_http_request_duration_seconds"),
                "Time to the response head, by method",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.5, 14)?),
            &["method"],
        )?;
        let bytes_in =
            IntCounter::new(format!("shoal_{component}_http_received_bytes_total"), "Request body bytes")?;
        let bytes_out =
            IntCounter::new(format!("shoal_{component}_http_sent_bytes_total"), "Response body bytes")?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(bytes_in.clone()))?;
        registry.register(Box::new(bytes_out.clone()))?;
        registry.register(Box::new(CertificateExpiry::new(component)?))?;
        Ok(HttpMetrics { registry, requests, duration, bytes_in, bytes_out })
    }
}

/// Count body bytes as they pass, without buffering.
fn counted(body: Body, counter: IntCounter) -> Body {
    Body::from_stream(body.into_data_stream().inspect(move |chunk| {
        if let Ok(c) = chunk {
            counter.inc_by(c.len() as u64);
        }
    }))
}

/// A request method as a metric label: the methods HTTP and the registry API use, and
/// `other` for the rest. A client chooses the method (hyper takes any token), and each label
/// value is a series kept for good: made-up methods grew memory and every scrape without end.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::PUT,
        Method::POST,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    KNOWN.iter().find(|m| *m == method).map_or("other", |m| m.as_str())
}

async fn observe(State(metrics): State<HttpMetrics>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    // The query matters in the log: containerd's mirror requests carry `?ns=<upstream>`.
    let path =
        request.uri().path_and_query().map_or_else(|| request.uri().path().to_string(), |p| p.to_string());
    let request = request.map(|b| counted(b, metrics.bytes_in.clone()));
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status();
    let bytes = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let principal = response
        .extensions()
        .get::<shoal_registry::auth::ServedPrincipal>()
        .map_or_else(|| "-".to_string(), |p| p.0.to_string());
    let label = method_label(&method);
    metrics.requests.with_label_values(&[label, status.as_str()]).inc();
    metrics.duration.with_label_values(&[label]).observe(elapsed.as_secs_f64());
    tracing::info!(
        method = %method,
        path = %path,
        status = status.as_u16(),
        bytes = %bytes,
        principal = %principal,
        ms = format!("{:.1}", elapsed.as_secs_f64() * 1000.0),
        "request"
    );
    let counter = metrics.bytes_out.clone();
    let (mut parts, body) = response.into_parts();
    // Wrapping the body hides its size from hyper; keep the length explicit.
    if let Some(len) = axum::body::HttpBody::size_hint(&body).exact() {
        parts.headers.entry(header::CONTENT_LENGTH).or_insert_with(|| len.into());
    }
    Response::from_parts(parts, counted(body, counter))
}

/// 200 while ready; 503 with the reason otherwise (draining, disk nearly full).
async fn ready(State(readiness): State<Arc<Readiness>>) -> Response {
    match readiness.status() {
        Ok(()) => "ready\n".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
    }
}

async fn metrics_text(State(metrics): State<HttpMetrics>) -> Response {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&metrics.registry.gather(), &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], buf).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Wrap `api` with request metrics and logging, and add health, readiness and metrics routes.
/// Those three are neither counted nor logged: a pod's probes and scrapes (a third of a
/// request a second) drowned its registry requests, so an agent answering every pull with
/// 503 stayed below the pull-error alert's share, and filled its log.
pub fn with_basics(api: Router, metrics: HttpMetrics, readiness: Arc<Readiness>) -> Router {
    api.layer(axum::middleware::from_fn_with_state(metrics.clone(), observe))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready).with_state(readiness))
        .route("/metrics", get(metrics_text).with_state(metrics))
}

/// A component's HTTP server, bound and ready; `serve` runs it until `shutdown` resolves,
/// then drains (see `readiness`).
pub struct BoundServer {
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    readiness: Arc<Readiness>,
    /// Run once the server has stopped (an agent leaving its swarms).
    after_stop: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    /// TLS for this listener instead of the process's default (`Some(None)`: plain).
    tls: Option<Option<shoal_tls::TlsAcceptor>>,
}

impl BoundServer {
    /// Bind `addr` for `app` (already wrapped with [`with_basics`] around `readiness`), served
    /// within `limits`.
    pub async fn bind(
        addr: std::net::SocketAddr,
        app: Router,
        limits: HttpLimits,
        readiness: Arc<Readiness>,
    ) -> anyhow::Result<BoundServer> {
        use anyhow::Context;
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        Ok(BoundServer { listener, app, limits, readiness, after_stop: None, tls: None })
    }

    /// Serve this listener with `acceptor` (or plain), not the process's default TLS.
    pub fn with_tls(mut self, acceptor: Option<shoal_tls::TlsAcceptor>) -> BoundServer {
        self.tls = Some(acceptor);
        self
    }

    /// Run `work` after the server has stopped serving, before `serve` returns.
    pub fn after_stop(mut self, work: impl std::future::Future<Output = ()> + Send + 'static) -> BoundServer {
        self.after_stop = Some(Box::pin(work));
        self
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve until `shutdown` resolves; then answer `/readyz` with 503 for `drain_delay`
    /// (so load balancers stop sending), stop accepting, and give requests in flight
    /// `shutdown_timeout` to finish.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (readiness, delay) = (self.readiness.clone(), self.limits.drain_delay);
        let draining = async move {
            shutdown.await;
            readiness.drain();
            tracing::info!(delay = ?delay, "draining: /readyz answers 503 until the listener closes");
            tokio::time::sleep(delay).await;
        };
        // The process's TLS context (installed at start): TLS on every listener when it has
        // a certificate.
        let tls = self.tls.unwrap_or_else(|| shoal_tls::current().acceptor());
        crate::http_server::serve(self.listener, self.app, self.limits, tls, draining).await;
        if let Some(work) = self.after_stop {
            work.await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// Methods a client makes up are counted as `other`: one series each grew memory and
    /// every scrape without end.
    #[tokio::test]
    async fn made_up_methods_share_one_label() {
        let metrics = HttpMetrics::new("test").unwrap();
        let api = Router::new().route("/v2/", get(|| async { "{}" }));
        let app = with_basics(api, metrics.clone(), Readiness::new(vec![]));
        for i in 0..200 {
            let method = axum::http::Method::from_bytes(format!("M{i}").as_bytes()).unwrap();
            let request = Request::builder().method(method).uri("/v2/").body(Body::empty()).unwrap();
            app.clone().oneshot(request).await.unwrap();
        }
        let request = Request::builder().uri("/v2/").body(Body::empty()).unwrap();
        app.clone().oneshot(request).await.unwrap();
        let mut methods = std::collections::BTreeSet::new();
        for family in metrics.registry.gather() {
            for m in family.get_metric() {
                for l in m.get_label() {
                    if l.name() == "method" {
                        methods.insert(l.value().to_string());
                    }
                }
            }
        }
        assert_eq!(methods, ["GET", "other"].map(String::from).into());
    }

    /// Requests counted, by path: the registry's, never probes or scrapes.
    #[tokio::test]
    async fn probes_and_scrapes_are_not_counted() {
        let metrics = HttpMetrics::new("test").unwrap();
        let api = Router::new().route("/v2/", get(|| async { "{}" }));
        let app = with_basics(api, metrics.clone(), Readiness::new(vec![]));
        for path in ["/healthz", "/readyz", "/metrics", "/healthz", "/v2/", "/nowhere"] {
            let request = Request::builder().uri(path).body(Body::empty()).unwrap();
            app.clone().oneshot(request).await.unwrap();
        }
        let counted: u64 = ["200", "404"]
            .iter()
            .map(|status| metrics.requests.with_label_values(&["GET", status]).get())
            .sum();
        assert_eq!(counted, 2, "only /v2/ and the unknown path count");
    }
}
