//! Ollama's HTTP API, as documented in ollama/docs/api.md: `GET /api/ps` lists the loaded
//! models with their memory (`size`) and the part of it in VRAM (`size_vram`).
//!
//! The address comes from the inspected process's own environment and its name proves
//! nothing, so infermem asks only a loopback address, and only after checking that the socket
//! listening there belongs to that very process: the inode of the LISTEN socket in the
//! process's `/proc/<pid>/net/tcp*` (its network namespace) must be one of its open fds.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use procfs::{
    net::TcpState,
    process::{FDTarget, Process},
};

use serde::{Deserialize, Serialize};

/// Ollama's default listen address.
pub const DEFAULT_HOST: &str = "127.0.0.1:11434";

/// One entry of `/api/ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadedModel {
    pub name: String,
    #[serde(default)]
    pub model: String,
    /// Bytes the model takes (weights, KV cache, graph), CPU and GPU together.
    #[serde(default)]
    pub size: u64,
    /// The part of `size` in GPU memory.
    #[serde(default)]
    pub size_vram: u64,
    #[serde(default)]
    pub digest: String,
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Context length the model was loaded with (newer Ollama versions report it).
    #[serde(default)]
    pub context_length: Option<u64>,
    #[serde(default)]
    pub details: Option<ModelDetails>,
}

/// `details` of an `/api/ps` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDetails {
    #[serde(default)]
    pub format: String,
    #[serde(default)]
    pub family: String,
    #[serde(default)]
    pub parameter_size: String,
    #[serde(default)]
    pub quantization_level: String,
}

#[derive(Deserialize)]
struct PsResponse {
    #[serde(default)]
    models: Vec<LoadedModel>,
}

/// The address to query, from the server's `OLLAMA_HOST` (a listen address such as
/// `0.0.0.0:11434`, `:8080` or `http://host:port`) or the default.
pub fn api_address(environ: &[(String, String)]) -> String {
    let Some((_, host)) = environ.iter().find(|(k, _)| k == "OLLAMA_HOST") else {
        return DEFAULT_HOST.to_owned();
    };
    let host = host
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let (addr, port) = match host.rsplit_once(':') {
        Some((addr, port)) => (addr, port),
        None => (host, "11434"),
    };
    // A wildcard listen address is reached through loopback.
    let addr = match addr {
        "" | "0.0.0.0" | "[::]" | "::" => "127.0.0.1",
        other => other,
    };
    format!("{addr}:{port}")
}

/// Asks the Ollama server `pid` which models are loaded, if it listens itself on the loopback
/// address its environment names; the error says why it was not asked or did not answer.
pub fn ask_own_server(
    pid: u32,
    environ: &[(String, String)],
    timeout: Duration,
) -> Result<Vec<LoadedModel>, String> {
    let address = owned_api_address(pid, environ)
        .map_err(|why| format!("Ollama's API was not asked: {why}"))?;
    loaded_models(&address.to_string(), timeout)
        .map_err(|err| format!("Ollama's API at {address} did not answer: {err}"))
}

/// The API address of the Ollama server `pid`, when it is a loopback address on which `pid`
/// itself listens.
pub fn owned_api_address(pid: u32, environ: &[(String, String)]) -> Result<SocketAddr, String> {
    let text = api_address(environ);
    let address: SocketAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address and port"))?;
    if !address.ip().is_loopback() {
        return Err(format!("{address} is not a loopback address"));
    }
    if !listens_on(pid, address)? {
        return Err(format!("pid {pid} does not itself listen on {address}"));
    }
    Ok(address)
}

/// Whether `pid` holds a socket listening on `address` (or on its port at a wildcard
/// address): a LISTEN entry of `/proc/<pid>/net/tcp` or `tcp6` whose inode is one of the
/// process's `socket:[inode]` fds.
pub fn listens_on(pid: u32, address: SocketAddr) -> Result<bool, String> {
    let process = Process::new(pid as i32).map_err(|e| format!("pid {pid}: {e}"))?;
    let entries = process.tcp().into_iter().chain(process.tcp6()).flatten();
    let listening: HashSet<u64> = entries
        .filter(|e| e.state == TcpState::Listen && serves(e.local_address, address))
        .map(|e| e.inode)
        .collect();
    if listening.is_empty() {
        return Ok(false);
    }
    let fds = process
        .fd()
        .map_err(|e| format!("pid {pid}'s file descriptors: {e}"))?;
    Ok(fds
        .flatten()
        .any(|fd| matches!(fd.target, FDTarget::Socket(inode) if listening.contains(&inode))))
}

/// Whether a socket bound to `local` accepts connections to `target`.
fn serves(local: SocketAddr, target: SocketAddr) -> bool {
    let ip = local.ip().to_canonical();
    local.port() == target.port() && (ip.is_unspecified() || ip == target.ip().to_canonical())
}

/// Parses a `/api/ps` response body.
pub fn parse_ps(body: &str) -> Result<Vec<LoadedModel>, String> {
    serde_json::from_str::<PsResponse>(body)
        .map(|r| r.models)
        .map_err(|e| format!("unexpected /api/ps response: {e}"))
}

/// Asks the Ollama server at `address` which models are loaded (plain HTTP, short timeout).
pub fn loaded_models(address: &str, timeout: Duration) -> Result<Vec<LoadedModel>, String> {
    parse_ps(&crate::collect::http::get(address, "/api/ps", timeout)?)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpListener,
    };

    use super::*;

    /// The response documented in ollama/docs/api.md ("List Running Models").
    const DOCUMENTED_PS: &str = r#"{
      "models": [
        {
          "name": "mistral:latest",
          "model": "mistral:latest",
          "size": 5137025024,
          "digest": "2ae6f6dd7a3dd734790bbbf58b8909a606e0e7e97e94b7604e0aa7ae4490e6d8",
          "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "7.2B",
            "quantization_level": "Q4_0"
          },
          "expires_at": "2024-06-04T14:38:31.83753-07:00",
          "size_vram": 5137025024
        }
      ]
    }"#;

    #[test]
    fn parses_the_documented_response() {
        let models = parse_ps(DOCUMENTED_PS).unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!(models[0].size, 5_137_025_024);
        assert_eq!(models[0].size_vram, 5_137_025_024);
        assert_eq!(
            models[0].details.as_ref().unwrap().quantization_level,
            "Q4_0"
        );
        assert!(parse_ps("<html>").is_err());
    }

    #[test]
    fn listen_addresses_become_loopback_urls() {
        let env = |v: &str| vec![("OLLAMA_HOST".to_owned(), v.to_owned())];
        assert_eq!(api_address(&[]), "127.0.0.1:11434");
        assert_eq!(api_address(&env("0.0.0.0:11434")), "127.0.0.1:11434");
        assert_eq!(api_address(&env(":8080")), "127.0.0.1:8080");
        assert_eq!(api_address(&env("http://10.0.0.5:9000/")), "10.0.0.5:9000");
        assert_eq!(api_address(&env("myhost")), "myhost:11434");
    }

    /// Ollama itself cannot run here (no binary is reachable), so a loopback server plays it,
    /// answering with the documented response over real HTTP.
    #[test]
    fn queries_a_server_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).unwrap();
            let request = String::from_utf8_lossy(&request[..n]).to_string();
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{DOCUMENTED_PS}",
                DOCUMENTED_PS.len()
            )
            .unwrap();
            request
        });
        let models = loaded_models(&address, Duration::from_secs(5)).unwrap();
        assert_eq!(models[0].name, "mistral:latest");
        assert!(server.join().unwrap().starts_with("GET /api/ps HTTP/1.1"));
    }

    #[test]
    fn only_a_socket_the_process_holds_counts_as_its_own() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let me = std::process::id();
        assert!(listens_on(me, address).unwrap());
        let env = vec![("OLLAMA_HOST".to_owned(), address.to_string())];
        assert_eq!(owned_api_address(me, &env), Ok(address));
        let wildcard = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = wildcard.local_addr().unwrap().port();
        assert!(listens_on(me, SocketAddr::from(([127, 0, 0, 1], port))).unwrap());

        // The same port held by another process (a child that inherits nothing) is not ours:
        // pid 1 does not hold our socket.
        assert!(!listens_on(1, address).unwrap());
        let err = owned_api_address(1, &env).unwrap_err();
        assert!(err.contains("does not itself listen"), "{err}");
        drop(listener);
        assert!(!listens_on(me, address).unwrap(), "closed: nobody listens");
    }

    #[test]
    fn only_loopback_ip_addresses_are_asked() {
        let env = |v: &str| vec![("OLLAMA_HOST".to_owned(), v.to_owned())];
        let me = std::process::id();
        let err = owned_api_address(me, &env("10.0.0.5:9000")).unwrap_err();
        assert!(err.contains("not a loopback"), "{err}");
        let err = owned_api_address(me, &env("myhost")).unwrap_err();
        assert!(err.contains("not an IP address"), "{err}");
        // Nothing of ours listens on the default port.
        assert!(owned_api_address(me, &[]).is_err());
        let err = ask_own_server(me, &env("127.0.0.1:1"), Duration::from_secs(1)).unwrap_err();
        assert!(err.starts_with("Ollama's API was not asked"), "{err}");
    }

    #[test]
    fn an_absent_server_is_an_error_quickly() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        assert!(loaded_models(&address, Duration::from_secs(2)).is_err());
    }
}
