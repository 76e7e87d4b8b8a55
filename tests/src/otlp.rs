//! An OTLP receiver for the export tests, built from the official OpenTelemetry protos (the
//! `opentelemetry-proto` crate): a tonic gRPC server of the metrics and logs services, or an
//! HTTP/1.1 server of `POST /v1/metrics` and `/v1/logs` with protobuf bodies. It keeps what
//! arrives, flattened into points and log records the tests can search.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{
            ExportLogsServiceRequest, ExportLogsServiceResponse,
            logs_service_server::{LogsService, LogsServiceServer},
        },
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::{metric::Data, number_data_point},
};
use prost::Message as _;

/// One data point as it arrived, with its metric's and its resource's description.
#[derive(Debug, Clone)]
pub struct ReceivedPoint {
    pub metric: String,
    pub unit: String,
    /// `gauge`, `sum` (monotonic) or `updown` (a non-monotonic sum).
    pub kind: &'static str,
    pub attributes: BTreeMap<String, String>,
    pub value: f64,
    pub resource: BTreeMap<String, String>,
}

/// One log record as it arrived.
#[derive(Debug, Clone)]
pub struct ReceivedLog {
    pub event_name: String,
    pub severity: String,
    pub body: String,
    pub attributes: BTreeMap<String, String>,
    pub resource: BTreeMap<String, String>,
}

/// What arrived so far.
#[derive(Debug, Default)]
struct Store {
    points: Vec<ReceivedPoint>,
    logs: Vec<ReceivedLog>,
    /// Export requests received (metrics, logs).
    requests: (u32, u32),
    /// The values of the `x-infermem-test` header (HTTP) or metadata (gRPC) that arrived.
    test_headers: Vec<String>,
}

/// The header the tests set through the config or `OTEL_EXPORTER_OTLP_HEADERS`.
pub const TEST_HEADER: &str = "x-infermem-test";

/// A receiver on a loopback port, serving until dropped.
pub struct Receiver {
    /// The URL the agent exports to: `http://127.0.0.1:<port>`.
    pub endpoint: String,
    store: Arc<Mutex<Store>>,
    /// Runs the server; its tasks end when the receiver is dropped.
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    /// A gRPC receiver (the OTLP/gRPC metrics and logs services).
    pub fn grpc() -> Receiver {
        Receiver::start(|listener, store| {
            let service = Collector(store);
            let server = tonic::transport::Server::builder()
                .add_service(MetricsServiceServer::new(service.clone()))
                .add_service(LogsServiceServer::new(service));
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tokio::spawn(async move {
                let _ = server.serve_with_incoming(incoming).await;
            });
        })
    }

    /// An HTTP/protobuf receiver (`POST /v1/metrics`, `POST /v1/logs`).
    pub fn http() -> Receiver {
        Receiver::start(|listener, store| {
            tokio::spawn(serve_http(listener, store));
        })
    }

    fn start(serve: impl FnOnce(tokio::net::TcpListener, Arc<Mutex<Store>>)) -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a Tokio runtime");
        let store = Arc::new(Mutex::new(Store::default()));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(SocketAddr::from((
                [127, 0, 0, 1],
                0,
            ))))
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        let _guard = runtime.enter();
        serve(listener, Arc::clone(&store));
        Receiver {
            endpoint: format!("http://127.0.0.1:{port}"),
            store,
            _runtime: runtime,
        }
    }

    /// The points received so far.
    pub fn points(&self) -> Vec<ReceivedPoint> {
        self.store.lock().unwrap().points.clone()
    }

    /// The log records received so far.
    pub fn logs(&self) -> Vec<ReceivedLog> {
        self.store.lock().unwrap().logs.clone()
    }

    /// The values of [`TEST_HEADER`] received so far.
    pub fn test_headers(&self) -> Vec<String> {
        self.store.lock().unwrap().test_headers.clone()
    }

    /// Export requests received so far: (metrics, logs).
    pub fn requests(&self) -> (u32, u32) {
        self.store.lock().unwrap().requests
    }

    /// Waits until `found` finds something in what arrived, or panics after `timeout`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut found: impl FnMut(&Receiver) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = found(self) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} reached the receiver within {timeout:?} (requests: {:?})",
                self.requests()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The gRPC services, storing what they receive.
#[derive(Clone)]
struct Collector(Arc<Mutex<Store>>);

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let header = request.metadata().get(TEST_HEADER);
        record_header(&self.0, header.and_then(|v| v.to_str().ok()));
        store_metrics(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        store_logs(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

async fn serve_http(listener: tokio::net::TcpListener, store: Arc<Mutex<Store>>) {
    while let Ok((stream, _)) = listener.accept().await {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let service = service_fn(move |request| answer_http(request, Arc::clone(&store)));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer_http(
    request: Request<hyper::body::Incoming>,
    store: Arc<Mutex<Store>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = request.uri().path().to_owned();
    let header = request.headers().get(TEST_HEADER);
    record_header(&store, header.and_then(|v| v.to_str().ok()));
    let body = request.into_body().collect().await?.to_bytes();
    let status = match path.as_str() {
        "/v1/metrics" => match ExportMetricsServiceRequest::decode(body) {
            Ok(request) => {
                store_metrics(&store, request);
                StatusCode::OK
            }
            Err(_) => StatusCode::BAD_REQUEST,
        },
        "/v1/logs" => match ExportLogsServiceRequest::decode(body) {
            Ok(request) => {
                store_logs(&store, request);
                StatusCode::OK
            }
            Err(_) => StatusCode::BAD_REQUEST,
        },
        _ => StatusCode::NOT_FOUND,
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    Ok(response)
}

fn record_header(store: &Mutex<Store>, value: Option<&str>) {
    if let Some(value) = value {
        store.lock().unwrap().test_headers.push(value.to_owned());
    }
}

fn store_metrics(store: &Mutex<Store>, request: ExportMetricsServiceRequest) {
    let mut store = store.lock().unwrap();
    store.requests.0 += 1;
    for resource_metrics in request.resource_metrics {
        let resource = map_of(&resource_metrics.resource.unwrap_or_default().attributes);
        for scope in resource_metrics.scope_metrics {
            for metric in scope.metrics {
                let (kind, points) = match metric.data {
                    Some(Data::Gauge(g)) => ("gauge", g.data_points),
                    Some(Data::Sum(s)) if s.is_monotonic => ("sum", s.data_points),
                    Some(Data::Sum(s)) => ("updown", s.data_points),
                    _ => continue,
                };
                for point in points {
                    let value = match point.value {
                        Some(number_data_point::Value::AsDouble(v)) => v,
                        Some(number_data_point::Value::AsInt(v)) => v as f64,
                        None => continue,
                    };
                    store.points.push(ReceivedPoint {
                        metric: metric.name.clone(),
                        unit: metric.unit.clone(),
                        kind,
                        attributes: map_of(&point.attributes),
                        value,
                        resource: resource.clone(),
                    });
                }
            }
        }
    }
}

fn store_logs(store: &Mutex<Store>, request: ExportLogsServiceRequest) {
    let mut store = store.lock().unwrap();
    store.requests.1 += 1;
    for resource_logs in request.resource_logs {
        let resource = map_of(&resource_logs.resource.unwrap_or_default().attributes);
        for scope in resource_logs.scope_logs {
            for record in scope.log_records {
                store.logs.push(ReceivedLog {
                    event_name: record.event_name.clone(),
                    severity: record.severity_text.clone(),
                    body: record.body.as_ref().map(text_of).unwrap_or_default(),
                    attributes: map_of(&record.attributes),
                    resource: resource.clone(),
                });
            }
        }
    }
}

/// Attributes as text (an integer as its digits).
fn map_of(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(text_of).unwrap_or_default(),
            )
        })
        .collect()
}

fn text_of(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}
