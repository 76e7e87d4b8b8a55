//! OpenTelemetry export over OTLP (gRPC with tonic, or HTTP/protobuf): the catalogue as
//! observable instruments read every interval, and alerts as log records.
//!
//! The SDK's periodic reader and batch log processor run on their own threads; the gRPC
//! client needs a Tokio runtime, so the exporter owns a one-worker runtime of its own and
//! shuts the providers down (a last export) before it ends.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry::{
    KeyValue,
    logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity},
    metrics::{AsyncInstrument, Meter, MeterProvider as _},
};
use opentelemetry_otlp::{
    LogExporter, MetricExporter, WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _,
};
use opentelemetry_sdk::{
    Resource,
    logs::{SdkLogger, SdkLoggerProvider},
    metrics::{PeriodicReader, SdkMeterProvider},
};

use super::{
    OtlpConfig, OtlpProtocol, Source,
    catalogue::{self, Attr, Family, Kind, Metric},
};
use crate::act::hooks::{AlertEvent, AlertTap};

/// How long one collection's catalogue serves the other instruments' callbacks.
const CACHE_FOR: Duration = Duration::from_millis(500);

/// Whether the config or the environment asks for OTLP.
pub fn wanted(config: &OtlpConfig) -> bool {
    let env_endpoint = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
    ]
    .iter()
    .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
    config
        .enabled
        .unwrap_or(config.endpoint.is_some() || env_endpoint)
}

/// The transport: the config's, else `OTEL_EXPORTER_OTLP_PROTOCOL`, else gRPC.
fn protocol(config: &OtlpConfig) -> Result<OtlpProtocol, String> {
    if let Some(protocol) = config.protocol {
        return Ok(protocol);
    }
    match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Err(_) | Ok("") | Ok("grpc") => Ok(OtlpProtocol::Grpc),
        Ok("http/protobuf") => Ok(OtlpProtocol::HttpProtobuf),
        Ok(other) => Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported (grpc, http/protobuf)"
        )),
    }
}

/// The running exporter; dropping it exports a last time and stops.
pub struct Otlp {
    meters: SdkMeterProvider,
    logs: SdkLoggerProvider,
    /// Keeps the gRPC client's tasks running (the last field: dropped after the providers).
    _runtime: tokio::runtime::Runtime,
}

impl Otlp {
    /// Starts exporting the catalogue of `source`, as the config and the `OTEL_*` variables
    /// say.
    pub fn start(config: &OtlpConfig, source: Arc<dyn Source>) -> Result<Otlp, String> {
        let protocol = protocol(config)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("infermem-otlp")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the OTLP runtime: {e}"))?;
        let (metrics, logs) = match protocol {
            // tonic's channel spawns its tasks on the runtime it is built in.
            OtlpProtocol::Grpc => runtime.block_on(async { grpc_exporters(config) })?,
            // reqwest's blocking client must not be built inside a runtime.
            OtlpProtocol::HttpProtobuf => http_exporters(config)?,
        };
        let resource = resource(config);
        let mut reader = PeriodicReader::builder(metrics);
        if let Some(interval) = config.interval {
            reader = reader.with_interval(interval.0);
        }
        let meters = SdkMeterProvider::builder()
            .with_reader(reader.build())
            .with_resource(resource.clone())
            .build();
        register_instruments(&meters.meter("infermem"), source);
        let logs = SdkLoggerProvider::builder()
            .with_batch_exporter(logs)
            .with_resource(resource)
            .build();
        Ok(Otlp {
            meters,
            logs,
            _runtime: runtime,
        })
    }

    /// The tap that turns alerts into log records.
    pub fn alert_tap(&self) -> Arc<dyn AlertTap> {
        Arc::new(AlertLog(self.logs.logger("infermem")))
    }
}

impl Drop for Otlp {
    fn drop(&mut self) {
        if let Err(err) = self.meters.shutdown() {
            tracing::warn!("OTLP metrics: {err}");
        }
        if let Err(err) = self.logs.shutdown() {
            tracing::warn!("OTLP logs: {err}");
        }
    }
}

fn grpc_exporters(config: &OtlpConfig) -> Result<(MetricExporter, LogExporter), String> {
    let mut metrics = MetricExporter::builder().with_tonic();
    let mut logs = LogExporter::builder().with_tonic();
    if let Some(endpoint) = &config.endpoint {
        metrics = metrics.with_endpoint(endpoint);
        logs = logs.with_endpoint(endpoint);
    }
    if let Some(timeout) = config.timeout {
        metrics = metrics.with_timeout(timeout.0);
        logs = logs.with_timeout(timeout.0);
    }
    if !config.headers.is_empty() {
        metrics = metrics.with_metadata(metadata(config)?);
        logs = logs.with_metadata(metadata(config)?);
    }
    Ok((
        metrics
            .build()
            .map_err(|e| format!("OTLP gRPC metrics: {e}"))?,
        logs.build().map_err(|e| format!("OTLP gRPC logs: {e}"))?,
    ))
}

/// The config's headers as gRPC metadata.
fn metadata(
    config: &OtlpConfig,
) -> Result<opentelemetry_otlp::tonic_types::metadata::MetadataMap, String> {
    let headers: HashMap<String, String> = config.headers.clone().into_iter().collect();
    let headers =
        hyper::HeaderMap::try_from(&headers).map_err(|e| format!("[export.otlp] headers: {e}"))?;
    Ok(opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers))
}

fn http_exporters(config: &OtlpConfig) -> Result<(MetricExporter, LogExporter), String> {
    let headers: HashMap<String, String> = config.headers.clone().into_iter().collect();
    let mut metrics = MetricExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
    let mut logs = LogExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
    if let Some(endpoint) = &config.endpoint {
        let base = endpoint.trim_end_matches('/');
        metrics = metrics.with_endpoint(format!("{base}/v1/metrics"));
        logs = logs.with_endpoint(format!("{base}/v1/logs"));
    }
    if let Some(timeout) = config.timeout {
        metrics = metrics.with_timeout(timeout.0);
        logs = logs.with_timeout(timeout.0);
    }
    if !headers.is_empty() {
        metrics = metrics.with_headers(headers.clone());
        logs = logs.with_headers(headers);
    }
    Ok((
        metrics
            .build()
            .map_err(|e| format!("OTLP HTTP metrics: {e}"))?,
        logs.build().map_err(|e| format!("OTLP HTTP logs: {e}"))?,
    ))
}

/// `service.*` for the agent and `host.*` for the machine, under `OTEL_RESOURCE_ATTRIBUTES`
/// and `OTEL_SERVICE_NAME` (read by the SDK), under the config's `resource` table.
fn resource(config: &OtlpConfig) -> Resource {
    let host_id = std::fs::read_to_string("/etc/machine-id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default();
    let mut builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        builder = builder.with_service_name("infermem");
    }
    let mut attributes = vec![
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new(
            "service.instance.id",
            format!("{host_id}:{}", std::process::id()),
        ),
        KeyValue::new(
            "host.name",
            rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
        ),
        KeyValue::new("host.arch", host_arch()),
    ];
    if !host_id.is_empty() {
        attributes.push(KeyValue::new("host.id", host_id));
    }
    attributes.extend(
        config
            .resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
    );
    builder.with_attributes(attributes).build()
}

/// The `host.arch` value of the semantic conventions.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64",
        "x86" => "x86",
        other => other,
    }
}

/// The latest catalogue, shared by the callbacks of one collection.
struct Cached {
    source: Arc<dyn Source>,
    latest: Mutex<Option<(Instant, Arc<Vec<Family>>)>>,
}

impl Cached {
    fn families(&self) -> Arc<Vec<Family>> {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        match &*latest {
            Some((at, families)) if at.elapsed() < CACHE_FOR => Arc::clone(families),
            _ => {
                let families = Arc::new(catalogue::families(&self.source.view()));
                *latest = Some((Instant::now(), Arc::clone(&families)));
                families
            }
        }
    }

    /// Observes every point of `metric` through `observe`.
    fn observe(&self, metric: &Metric, observe: impl Fn(f64, &[KeyValue])) {
        let families = self.families();
        let Some(family) = families.iter().find(|f| f.metric.name == metric.name) else {
            return;
        };
        for point in &family.points {
            observe(point.value, &attributes(&point.attributes));
        }
    }
}

/// OpenTelemetry attributes: the pid as an integer, the rest as strings.
fn attributes(attrs: &[(Attr, String)]) -> Vec<KeyValue> {
    attrs
        .iter()
        .map(|(attr, value)| match (attr, value.parse::<i64>()) {
            (Attr::Pid, Ok(pid)) => KeyValue::new(attr.otel_key(), pid),
            _ => KeyValue::new(attr.otel_key(), value.clone()),
        })
        .collect()
}

/// One observable instrument per metric of the catalogue.
fn register_instruments(meter: &Meter, source: Arc<dyn Source>) {
    let cached = Arc::new(Cached {
        source,
        latest: Mutex::new(None),
    });
    for &metric in catalogue::METRICS {
        let cached = Arc::clone(&cached);
        match metric.kind {
            Kind::Counter => {
                meter
                    .u64_observable_counter(metric.name)
                    .with_unit(metric.unit)
                    .with_description(metric.help)
                    .with_callback(move |i: &dyn AsyncInstrument<u64>| {
                        cached.observe(metric, |v, a| i.observe(v as u64, a));
                    })
                    .build();
            }
            Kind::UpDownCounter => {
                meter
                    .i64_observable_up_down_counter(metric.name)
                    .with_unit(metric.unit)
                    .with_description(metric.help)
                    .with_callback(move |i: &dyn AsyncInstrument<i64>| {
                        cached.observe(metric, |v, a| i.observe(v as i64, a));
                    })
                    .build();
            }
            Kind::Gauge => {
                meter
                    .f64_observable_gauge(metric.name)
                    .with_unit(metric.unit)
                    .with_description(metric.help)
                    .with_callback(move |i: &dyn AsyncInstrument<f64>| {
                        cached.observe(metric, |v, a| i.observe(v, a));
                    })
                    .build();
            }
        }
    }
}

/// Alerts as OTLP log records.
struct AlertLog(SdkLogger);

impl AlertTap for AlertLog {
    fn alert(&self, event: &AlertEvent) {
        let (name, severity) = match event.kind.as_str() {
            "critical" => ("infermem.critical", Severity::Warn),
            "thrashing" => ("infermem.thrashing", Severity::Warn),
            "oom_kill" => ("infermem.oom_kill", Severity::Error),
            "action" => ("infermem.action", Severity::Info),
            _ => ("infermem.alert", Severity::Info),
        };
        let mut record = self.0.create_log_record();
        record.set_event_name(name);
        record.set_severity_number(severity);
        record.set_severity_text(severity.name());
        record.set_timestamp(std::time::SystemTime::now());
        record.set_body(AnyValue::String(event.body.to_string().into()));
        record.add_attribute("infermem.key", event.key.clone());
        if let Some(pid) = pid_of(&event.key) {
            record.add_attribute("process.pid", i64::from(pid));
        }
        self.0.emit(record);
    }
}

/// The pid an alert's key names (`pid:<pid>[:<start time>]`).
fn pid_of(key: &str) -> Option<u32> {
    key.strip_prefix("pid:")?.split(':').next()?.parse().ok()
}
