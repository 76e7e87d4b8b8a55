//! Plain HTTP to the local APIs of runtimes (Ollama, llama.cpp server): short timeouts and
//! bounded bodies, since the server at the other end is a process infermem does not trust.

use std::time::Duration;

/// Largest body read from a runtime's API.
pub const MAX_BODY: u64 = 4 << 20;

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .max_redirects(0)
        .build()
        .into()
}

/// `GET http://{address}{path}`: the body of a 2xx answer.
pub fn get(address: &str, path: &str, timeout: Duration) -> Result<String, String> {
    let url = format!("http://{address}{path}");
    agent(timeout)
        .get(&url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .map_err(|e| format!("reading {url}: {e}"))
}

/// `POST http://{address}{path}` with a JSON body: the body of a 2xx answer.
pub fn post_json(
    address: &str,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<String, String> {
    let url = format!("http://{address}{path}");
    agent(timeout)
        .post(&url)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .map_err(|e| format!("POST {url}: {e}"))?
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .map_err(|e| format!("reading {url}: {e}"))
}
