//! llama.cpp's `llama-server`, through its HTTP API: `/v1/models` (the model it serves),
//! `/slots` (its sequences, when started with the slots endpoint on) and `/metrics`
//! (Prometheus text, with `--metrics`). It serves one model for its whole life: it can
//! neither unload nor preload one.

use std::{collections::BTreeMap, net::SocketAddr};

use serde_json::Value;

use super::{
    CALL_TIMEOUT, ControlError, LoadedModel, RuntimeControl, ServerStats, Slot, owned_address,
};
use crate::collect::http;

/// llama-server's listen address unless told otherwise.
const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_PORT: u16 = 8080;

/// A llama.cpp server's API.
pub struct LlamaServer {
    pub address: SocketAddr,
}

/// The API of the llama.cpp server `pid`: `--host`/`--port` of its command line (or
/// `LLAMA_ARG_HOST`/`LLAMA_ARG_PORT`), on which it must listen itself.
pub fn connect(pid: u32) -> Result<Box<dyn RuntimeControl>, ControlError> {
    let identity = crate::collect::process::identity(pid).map_err(|_| ControlError::Reused(pid))?;
    let environ = crate::collect::process::environ(pid);
    let address = listen_address(&identity.cmdline, &environ)?;
    let address = owned_address(pid, &[address])?;
    Ok(Box::new(LlamaServer { address }))
}

/// The address the server listens on, from its arguments or environment; a wildcard host
/// is reached through loopback.
pub fn listen_address(
    cmdline: &[String],
    environ: &[(String, String)],
) -> Result<SocketAddr, ControlError> {
    let flag = |name: &str| {
        let at = cmdline.iter().position(|a| a == name)?;
        cmdline.get(at + 1).cloned()
    };
    let env = |key: &str| {
        environ
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let host = flag("--host").or_else(|| env("LLAMA_ARG_HOST"));
    let host = match host.as_deref() {
        None | Some("0.0.0.0") => DEFAULT_HOST.to_owned(),
        Some("::") => "::1".to_owned(),
        Some(other) => other.to_owned(),
    };
    let port = match flag("--port").or_else(|| env("LLAMA_ARG_PORT")) {
        Some(port) => port
            .parse()
            .map_err(|_| ControlError::NotOwned(format!("port {port:?} is not a number")))?,
        None => DEFAULT_PORT,
    };
    let ip = host
        .parse()
        .map_err(|_| ControlError::NotOwned(format!("host {host:?} is not an IP address")))?;
    Ok(SocketAddr::new(ip, port))
}

impl LlamaServer {
    fn get(&self, path: &str) -> Result<String, ControlError> {
        http::get(&self.address.to_string(), path, CALL_TIMEOUT).map_err(ControlError::Api)
    }
}

impl RuntimeControl for LlamaServer {
    fn runtime(&self) -> &'static str {
        "llama-cpp"
    }

    fn endpoint(&self) -> SocketAddr {
        self.address
    }

    fn loaded_models(&self) -> Result<Vec<LoadedModel>, ControlError> {
        parse_models(&self.get("/v1/models")?)
    }

    fn unload(&self, _model: &str) -> Result<(), ControlError> {
        Err(ControlError::Unsupported {
            runtime: "llama-server",
            what: "unload a model",
        })
    }

    fn preload(&self, _model: &str) -> Result<(), ControlError> {
        Err(ControlError::Unsupported {
            runtime: "llama-server",
            what: "load a model",
        })
    }

    /// The model, and the slots and metrics where the server has those endpoints on.
    fn server_stats(&self) -> Result<ServerStats, ControlError> {
        Ok(ServerStats {
            models: self.loaded_models()?,
            slots: self.get("/slots").ok().and_then(|body| parse_slots(&body)),
            metrics: self
                .get("/metrics")
                .map_or_else(|_| BTreeMap::new(), |b| parse_metrics(&b)),
        })
    }
}

/// `/v1/models` (OpenAI's form): `{"data": [{"id": …}]}`.
pub fn parse_models(body: &str) -> Result<Vec<LoadedModel>, ControlError> {
    let value: Value = serde_json::from_str(body)
        .map_err(|e| ControlError::Api(format!("unexpected /v1/models response: {e}")))?;
    let data = value["data"]
        .as_array()
        .ok_or_else(|| ControlError::Api("/v1/models has no data list".to_owned()))?;
    data.iter()
        .filter_map(|m| m["id"].as_str())
        .map(|id| {
            serde_json::from_value(serde_json::json!({ "name": id }))
                .map_err(|e| ControlError::Api(e.to_string()))
        })
        .collect()
}

/// `/slots`: a list of slots, busy by `is_processing` (newer servers) or `state` 1 (older).
pub fn parse_slots(body: &str) -> Option<Vec<Slot>> {
    let slots: Vec<Value> = serde_json::from_str(body).ok()?;
    let slot = |s: &Value| {
        Some(Slot {
            id: s["id"].as_u64()?,
            n_ctx: s["n_ctx"].as_u64(),
            busy: s["is_processing"]
                .as_bool()
                .unwrap_or(s["state"].as_u64() == Some(1)),
        })
    };
    slots.iter().map(slot).collect()
}

/// The `llamacpp:*` samples of a Prometheus text exposition.
pub fn parse_metrics(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|line| line.starts_with("llamacpp:"))
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}
