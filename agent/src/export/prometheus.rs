//! The Prometheus endpoint: `GET /metrics` on the configured address answers the catalogue,
//! read at scrape time, in the OpenMetrics text format (prometheus-client's encoder) when the
//! scraper asks for it, as Prometheus does, and otherwise in the classic text format 0.0.4
//! that `promtool check metrics`, older scrapers and people with curl read. Names are
//! the OpenTelemetry names with dots turned to underscores, the unit and `_total` appended,
//! behind `infermem_` (docs/metrics.md).
//!
//! The server is small on purpose: HTTP/1.1 (hyper), a bounded number of connections, a
//! deadline to send the request headers, and nothing but `GET /metrics` (and `/` pointing to
//! it) answered.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use tokio::{net::TcpListener, sync::Semaphore};

use super::{
    Source,
    catalogue::{self, Family, Kind},
};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// How long a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the classic text format.
const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The catalogue as a prometheus-client collector.
#[derive(Debug)]
struct CatalogueCollector(Arc<dyn Source>);

impl Collector for CatalogueCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in catalogue::families(&self.0.view()) {
            encode_family(&mut encoder, &family)?;
        }
        Ok(())
    }
}

fn encode_family(encoder: &mut DescriptorEncoder, family: &Family) -> Result<(), std::fmt::Error> {
    let metric = family.metric;
    let name = prometheus_name(metric.name);
    let unit = prometheus_unit(metric.unit);
    let metric_type = match metric.kind {
        Kind::Counter => MetricType::Counter,
        Kind::Gauge | Kind::UpDownCounter => MetricType::Gauge,
    };
    let mut descriptor =
        encoder.encode_descriptor(&name, metric.help, unit.as_ref(), metric_type)?;
    for point in &family.points {
        let labels: Vec<(&str, &str)> = point
            .attributes
            .iter()
            .map(|(attr, value)| (attr.prometheus_label(), value.as_str()))
            .collect();
        let sample = descriptor.encode_family(&labels)?;
        match metric.kind {
            Kind::Counter => ConstCounter::new(point.value).encode(sample)?,
            Kind::Gauge | Kind::UpDownCounter => ConstGauge::new(point.value).encode(sample)?,
        }
    }
    Ok(())
}

/// The name under the `infermem_` prefix: `process.memory.usage` → `process_memory_usage`,
/// `infermem.kv_cache.usage` → `kv_cache_usage` (the encoder appends unit and `_total`).
pub fn prometheus_name(otel_name: &str) -> String {
    otel_name
        .strip_prefix("infermem.")
        .unwrap_or(otel_name)
        .replace('.', "_")
}

/// The Prometheus unit of a UCUM unit: bytes and seconds; none for `1` and annotations.
fn prometheus_unit(ucum: &str) -> Option<Unit> {
    match ucum {
        "By" => Some(Unit::Bytes),
        "s" => Some(Unit::Seconds),
        _ => None,
    }
}

/// The whole exposition, as `/metrics` answers it.
pub fn render(source: Arc<dyn Source>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("infermem");
    registry.register_collector(Box::new(CatalogueCollector(source)));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// Binds the endpoint's address (so that a taken port fails the start, not a later scrape).
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves `/metrics` until `stopped` turns true.
pub async fn serve(
    listener: TcpListener,
    source: Arc<dyn Source>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stopped.changed() => return,
            permit = Arc::clone(&slots).acquire_owned() => permit.expect("never closed"),
        };
        let accepted = tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!("prometheus endpoint: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = Arc::clone(&source);
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, Arc::clone(&source)));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(err) = connection.await {
                tracing::debug!("prometheus endpoint: connection ended: {err}");
            }
            drop(permit);
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    source: Arc<dyn Source>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let plain = "text/plain; charset=utf-8";
    let reply = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => metrics(&request, source),
        (&Method::GET | &Method::HEAD, "/") => respond(
            StatusCode::OK,
            plain,
            "infermem: metrics at /metrics\n".into(),
        ),
        (&Method::GET | &Method::HEAD, _) => {
            respond(StatusCode::NOT_FOUND, plain, "not found\n".into())
        }
        _ => respond(StatusCode::METHOD_NOT_ALLOWED, plain, "only GET\n".into()),
    };
    Ok(reply)
}

/// The exposition in the format the scraper accepts.
fn metrics(request: &Request<Incoming>, source: Arc<dyn Source>) -> Response<Full<Bytes>> {
    let wants_openmetrics = request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    match render(source) {
        Ok(text) if wants_openmetrics => respond(StatusCode::OK, OPENMETRICS, text),
        Ok(text) => respond(StatusCode::OK, TEXT_004, to_text_format(&text)),
        Err(_) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            "encoding failed\n".into(),
        ),
    }
}

/// The classic text format (0.0.4) of an OpenMetrics exposition: a counter family is named
/// after its samples (`x_total`, not `x`), and the `# UNIT` and `# EOF` lines go. The help
/// texts of the catalogue hold no `"` or `\`, whose escaping differs between the two.
pub fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match descriptor {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                text.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}
