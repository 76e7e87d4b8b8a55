//! The export stage, last in the pipeline beside the local API: what the agent knows, as
//! OpenTelemetry metrics and log records (OTLP over gRPC or HTTP/protobuf) and as a
//! Prometheus endpoint. Both read one catalogue ([`catalogue`]) built from the answers the
//! API gives (`ps`, `status`) to a caller who sees everything, so the two exports and the
//! CLI never disagree. The names, units and attributes are documented in `docs/metrics.md`.

pub mod catalogue;
pub mod otlp;
pub mod prometheus;

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use serde::Deserialize;

use crate::{
    api::{Peer, Service as _},
    config::Interval,
    daemon::{Agent, service::AgentService},
};

pub use catalogue::View;

/// What the exporters read: the agent's view of the moment.
pub trait Source: std::fmt::Debug + Send + Sync + 'static {
    fn view(&self) -> View;
}

/// A running agent as a source: its `ps` and `status` answers to a caller who sees
/// everything, and the number of actions in force.
pub struct AgentSource {
    pub agent: Arc<Agent>,
    pub command_line: bool,
}

impl std::fmt::Debug for AgentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSource").finish_non_exhaustive()
    }
}

impl Source for AgentSource {
    fn view(&self) -> View {
        let service = AgentService(Arc::clone(&self.agent));
        let everything = Peer::local();
        let actions_in_force = self
            .agent
            .act()
            .actions
            .as_ref()
            .map(|actions| actions.view().in_force.len() as u64);
        View {
            ps: service.ps(&everything),
            status: service.status(&everything),
            actions_in_force,
            command_line: self.command_line,
        }
    }
}

/// `[export]`: the Prometheus endpoint and the OTLP exporter.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Where the Prometheus endpoint listens (`/metrics`); none: no endpoint.
    pub prometheus: Option<SocketAddr>,
    /// Whether process series carry their command line (`process.command_line`), with
    /// secrets redacted as `inspect` redacts them. Off by default: command lines can name
    /// private paths.
    pub command_line: bool,
    /// `[export.otlp]`.
    pub otlp: OtlpConfig,
}

/// `[export.otlp]`: where OTLP goes. A key left out falls back to the standard
/// `OTEL_EXPORTER_OTLP_*` variables, then to the OpenTelemetry defaults.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// Export over OTLP. Default: on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the metrics or
    /// logs endpoint) is set, or when `endpoint` is.
    pub enabled: Option<bool>,
    /// The collector's URL: `http://host:4317` for gRPC, `http://host:4318` for HTTP (the
    /// signal's path, `/v1/metrics` or `/v1/logs`, is appended for HTTP).
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf` (`OTEL_EXPORTER_OTLP_PROTOCOL`; default `grpc`).
    pub protocol: Option<OtlpProtocol>,
    /// Headers sent with every export (authentication, tenancy).
    pub headers: BTreeMap<String, String>,
    /// How often metrics are exported (`OTEL_METRIC_EXPORT_INTERVAL`; default 10 s).
    pub interval: Option<Interval>,
    /// The limit of one export (`OTEL_EXPORTER_OTLP_TIMEOUT`; default 10 s).
    pub timeout: Option<Interval>,
    /// Resource attributes added to `OTEL_RESOURCE_ATTRIBUTES` (a key here wins).
    pub resource: BTreeMap<String, String>,
}

/// The OTLP transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

#[cfg(test)]
mod tests;
