//! Runtime control against real servers over real HTTP. No Ollama binary can be installed on
//! these machines, so `tests/ollama/fake_ollama.py` plays one, following Ollama's documented
//! API, as a process of its own (its listening socket is what the ownership check reads); a
//! llama.cpp server is played by a thread answering the documented endpoints.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    process::{Child, Command, Stdio},
};

use super::{
    llama_server::{self, LlamaServer, listen_address},
    *,
};

const FAKE_OLLAMA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/ollama/fake_ollama.py"
);

/// A fake Ollama server on a free loopback port (or on `port`), with `models` loaded.
struct FakeOllama {
    child: Child,
    port: u16,
}

impl FakeOllama {
    fn start(port: Option<u16>, models: &[&str]) -> FakeOllama {
        let port = port.unwrap_or_else(free_port);
        let mut child = Command::new("python3")
            .arg(FAKE_OLLAMA)
            .args(models)
            .env("OLLAMA_HOST", format!("127.0.0.1:{port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs the fake Ollama server");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.contains("listening"), "the fake server said {line:?}");
        // Keep reading what it logs, so that its prints never meet a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        FakeOllama { child, port }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn start_time(&self) -> u64 {
        crate::collect::process::identity(self.pid())
            .unwrap()
            .start_time
    }
}

impl Drop for FakeOllama {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn names(models: &[LoadedModel]) -> Vec<&str> {
    models.iter().map(|m| m.name.as_str()).collect()
}

#[test]
fn ollama_lists_unloads_and_preloads_through_its_own_socket() {
    let server = FakeOllama::start(None, &["llama3:8b", "qwen3:4b"]);
    let control = connect(server.pid(), server.start_time(), "ollama").unwrap();
    assert_eq!(control.runtime(), "ollama");
    assert_eq!(control.endpoint().port(), server.port);
    assert_eq!(
        names(&control.loaded_models().unwrap()),
        ["llama3:8b", "qwen3:4b"]
    );
    control.unload("llama3:8b").unwrap();
    assert_eq!(names(&control.loaded_models().unwrap()), ["qwen3:4b"]);
    control.preload("llama3:8b").unwrap();
    let stats = control.server_stats().unwrap();
    assert_eq!(names(&stats.models), ["qwen3:4b", "llama3:8b"]);
    assert_eq!(stats.slots, None);
}

#[test]
fn a_port_held_by_another_process_or_a_reused_pid_is_refused() {
    let owner = FakeOllama::start(None, &["llama3:8b"]);
    // A second process whose OLLAMA_HOST names the first one's port (it cannot bind it).
    let mut impostor = Command::new("sleep")
        .arg("30")
        .env("OLLAMA_HOST", format!("127.0.0.1:{}", owner.port))
        .spawn()
        .unwrap();
    let start = crate::collect::process::identity(impostor.id())
        .unwrap()
        .start_time;
    let err = connect(impostor.id(), start, "ollama")
        .err()
        .expect("refused");
    assert!(matches!(err, ControlError::NotOwned(_)), "{err}");
    assert!(err.to_string().contains("does not itself listen"), "{err}");
    let _ = impostor.kill();
    let _ = impostor.wait();
    let err = connect(owner.pid(), owner.start_time() + 1, "ollama")
        .err()
        .expect("refused");
    assert!(matches!(err, ControlError::Reused(_)), "{err}");
    let err = connect(owner.pid(), owner.start_time(), "vllm")
        .err()
        .expect("refused");
    assert!(matches!(err, ControlError::UnknownRuntime(_)), "{err}");
}

/// A thread answering llama-server's endpoints: `/slots` answers `slots_status`.
fn llama_server(slots_status: u16) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        for _ in 0..3 {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 2048];
            let n = stream.read(&mut request).unwrap();
            let head = String::from_utf8_lossy(&request[..n]).to_string();
            let (status, body) = if head.starts_with("GET /v1/models") {
                (
                    200,
                    r#"{"object":"list","data":[{"id":"qwen3-4b-q4_0.gguf","object":"model"}]}"#,
                )
            } else if head.starts_with("GET /slots") {
                (
                    slots_status,
                    r#"[{"id":0,"n_ctx":4096,"is_processing":true},{"id":1,"n_ctx":4096,"is_processing":false}]"#,
                )
            } else {
                (
                    200,
                    "# HELP llamacpp:kv_cache_usage_ratio KV-cache usage.\n# TYPE llamacpp:kv_cache_usage_ratio gauge\nllamacpp:kv_cache_usage_ratio 0.25\nllamacpp:requests_processing 1\n",
                )
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (address, thread)
}

#[test]
fn llama_server_reports_its_model_slots_and_metrics_and_cannot_unload() {
    let (address, thread) = llama_server(200);
    let server = LlamaServer { address };
    let stats = server.server_stats().unwrap();
    thread.join().unwrap();
    assert_eq!(names(&stats.models), ["qwen3-4b-q4_0.gguf"]);
    let slots = stats.slots.unwrap();
    assert_eq!(
        (slots.len(), slots[0].busy, slots[1].busy),
        (2, true, false)
    );
    assert_eq!(stats.metrics["llamacpp:kv_cache_usage_ratio"], 0.25);
    assert!(matches!(
        server.unload("x"),
        Err(ControlError::Unsupported { .. })
    ));

    // Slots off (501): the rest still answers.
    let (address, thread) = llama_server(501);
    let stats = LlamaServer { address }.server_stats().unwrap();
    thread.join().unwrap();
    assert_eq!(stats.slots, None);
    assert_eq!(stats.metrics["llamacpp:requests_processing"], 1.0);
}

#[test]
fn llama_server_addresses_come_from_its_arguments_or_environment() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        listen_address(&args(&["llama-server"]), &[])
            .unwrap()
            .to_string(),
        "127.0.0.1:8080"
    );
    let cmd = args(&["llama-server", "--host", "0.0.0.0", "--port", "9000"]);
    assert_eq!(
        listen_address(&cmd, &[]).unwrap().to_string(),
        "127.0.0.1:9000"
    );
    let env = [("LLAMA_ARG_PORT".to_owned(), "7000".to_owned())];
    assert_eq!(
        listen_address(&args(&["llama-server"]), &env)
            .unwrap()
            .port(),
        7000
    );
    assert!(listen_address(&args(&["x", "--port", "http"]), &[]).is_err());
    assert!(listen_address(&args(&["x", "--host", "example.org"]), &[]).is_err());
    assert!(llama_server::parse_slots(r#"[{"id":3,"state":1}]"#).unwrap()[0].busy);
    assert!(llama_server::parse_models("<html>").is_err());
}
