//! Ollama, through its documented API (ollama/docs/api.md): `GET /api/ps` lists the loaded
//! models; `POST /api/generate` with a model and no prompt loads it, and with
//! `"keep_alive": 0` unloads it.

use std::net::SocketAddr;

use serde_json::json;

use super::{
    CALL_TIMEOUT, ControlError, LoadedModel, PRELOAD_TIMEOUT, RuntimeControl, ServerStats,
    owned_address,
};
use crate::{collect::http, model::ollama};

/// An Ollama server's API.
pub struct Ollama {
    address: SocketAddr,
}

/// The API of the Ollama server `pid`: the address of its `OLLAMA_HOST`, on which it must
/// listen itself.
pub fn connect(pid: u32) -> Result<Box<dyn RuntimeControl>, ControlError> {
    let environ = crate::collect::process::environ(pid);
    let text = ollama::api_address(&environ);
    let address: SocketAddr = text
        .parse()
        .map_err(|_| ControlError::NotOwned(format!("{text:?} is not an IP address and port")))?;
    let address = owned_address(pid, &[address])?;
    Ok(Box::new(Ollama { address }))
}

impl RuntimeControl for Ollama {
    fn runtime(&self) -> &'static str {
        "ollama"
    }

    fn endpoint(&self) -> SocketAddr {
        self.address
    }

    fn loaded_models(&self) -> Result<Vec<LoadedModel>, ControlError> {
        ollama::loaded_models(&self.address.to_string(), CALL_TIMEOUT).map_err(ControlError::Api)
    }

    fn unload(&self, model: &str) -> Result<(), ControlError> {
        let body = json!({ "model": model, "keep_alive": 0 });
        http::post_json(
            &self.address.to_string(),
            "/api/generate",
            &body,
            CALL_TIMEOUT,
        )
        .map(drop)
        .map_err(ControlError::Api)
    }

    fn preload(&self, model: &str) -> Result<(), ControlError> {
        let body = json!({ "model": model });
        http::post_json(
            &self.address.to_string(),
            "/api/generate",
            &body,
            PRELOAD_TIMEOUT,
        )
        .map(drop)
        .map_err(ControlError::Api)
    }

    fn server_stats(&self) -> Result<ServerStats, ControlError> {
        Ok(ServerStats {
            models: self.loaded_models()?,
            ..ServerStats::default()
        })
    }
}
