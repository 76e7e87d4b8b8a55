//! Reconfiguring a model runtime through its own local API, behind one trait: adding a
//! runtime means a module implementing [`RuntimeControl`] and a line in [`CONTROLS`].
//!
//! The API's address comes from the process's own environment or command line, which it
//! controls, so infermem talks only to a loopback address on which that very process holds
//! the listening socket ([`crate::model::ollama::listens_on`]), and checks the process's
//! start time before and after, so that a reused pid cannot redirect it.

pub mod llama_server;
pub mod ollama;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::Serialize;

pub use crate::model::ollama::LoadedModel;

/// How long one call to a runtime's API may take (a preload loads a model: longer).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
pub const PRELOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a runtime could not be reconfigured.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{runtime} cannot {what} through its API")]
    Unsupported {
        runtime: &'static str,
        what: &'static str,
    },
    #[error("no control for runtime {0:?} (known: ollama, llama-cpp)")]
    UnknownRuntime(String),
    #[error("{0}")]
    NotOwned(String),
    #[error("pid {0} is another process now, or gone")]
    Reused(u32),
    #[error("{0}")]
    Api(String),
}

/// A runtime's state as its API reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServerStats {
    pub models: Vec<LoadedModel>,
    /// llama.cpp server: its slots (`/slots`), when that endpoint is on.
    pub slots: Option<Vec<Slot>>,
    /// llama.cpp server: the `llamacpp:*` samples of `/metrics`, when that endpoint is on.
    pub metrics: BTreeMap<String, f64>,
}

/// A llama.cpp server slot: one sequence it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Slot {
    pub id: u64,
    pub n_ctx: Option<u64>,
    pub busy: bool,
}

/// What infermem can ask of a runtime.
pub trait RuntimeControl: Send {
    /// The runtime's id, as `infermem ps` names it.
    fn runtime(&self) -> &'static str;
    /// The address of its API.
    fn endpoint(&self) -> SocketAddr;
    /// The models it has in memory.
    fn loaded_models(&self) -> Result<Vec<LoadedModel>, ControlError>;
    /// Frees a model's memory.
    fn unload(&self, model: &str) -> Result<(), ControlError>;
    /// Loads a model before it is asked for.
    fn preload(&self, model: &str) -> Result<(), ControlError>;
    /// Its models, slots and metrics.
    fn server_stats(&self) -> Result<ServerStats, ControlError>;
}

/// Connects to the API of the process `pid`, found by its own listening socket.
type Connector = fn(pid: u32) -> Result<Box<dyn RuntimeControl>, ControlError>;

/// The runtimes infermem can talk to, by runtime id.
const CONTROLS: &[(&str, Connector)] = &[
    ("ollama", ollama::connect),
    ("llama-cpp", llama_server::connect),
];

/// The control of the runtime `runtime` that the process `pid` (started at `start_time`)
/// serves.
pub fn connect(
    pid: u32,
    start_time: u64,
    runtime: &str,
) -> Result<Box<dyn RuntimeControl>, ControlError> {
    let (_, connector) = CONTROLS
        .iter()
        .find(|(id, _)| *id == runtime)
        .ok_or_else(|| ControlError::UnknownRuntime(runtime.to_owned()))?;
    same_process(pid, start_time)?;
    let control = connector(pid)?;
    same_process(pid, start_time)?;
    Ok(control)
}

/// The control of whichever known runtime `pid` serves, tried in [`CONTROLS`]' order; the
/// error says why each one did not fit.
pub fn connect_any(pid: u32, start_time: u64) -> Result<Box<dyn RuntimeControl>, ControlError> {
    let mut why = Vec::new();
    for (id, _) in CONTROLS {
        match connect(pid, start_time, id) {
            Ok(control) => return Ok(control),
            Err(err @ ControlError::Reused(_)) => return Err(err),
            Err(err) => why.push(format!("{id}: {err}")),
        }
    }
    Err(ControlError::NotOwned(why.join("; ")))
}

fn same_process(pid: u32, start_time: u64) -> Result<(), ControlError> {
    match crate::collect::process::identity(pid) {
        Ok(id) if id.start_time == start_time => Ok(()),
        _ => Err(ControlError::Reused(pid)),
    }
}

/// The loopback address on which `pid` itself listens, of those given.
fn owned_address(pid: u32, candidates: &[SocketAddr]) -> Result<SocketAddr, ControlError> {
    for address in candidates {
        let listens =
            crate::model::ollama::listens_on(pid, *address).map_err(ControlError::NotOwned)?;
        if address.ip().is_loopback() && listens {
            return Ok(*address);
        }
    }
    Err(ControlError::NotOwned(format!(
        "pid {pid} does not itself listen on {}",
        candidates
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    )))
}

#[cfg(test)]
mod tests;
