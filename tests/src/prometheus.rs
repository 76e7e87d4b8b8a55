//! A real Prometheus server (Debian's package, `/usr/bin/prometheus`) scraping an agent's
//! endpoint every second, and queries through its HTTP API.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long Prometheus may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The limit of one HTTP request to Prometheus or to the agent.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A loopback port free now (the OS picks it; taken back at once).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// An HTTP agent whose non-2xx answers are answers, with a timeout.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(REQUEST_TIMEOUT))
        .build()
        .into()
}

/// `GET url` as text (for the agent's `/metrics`).
pub fn get_text(url: &str) -> String {
    let mut response = agent()
        .get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    response.body_mut().read_to_string().expect("a text body")
}

/// A Prometheus server, killed when dropped.
pub struct Prometheus {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

impl Prometheus {
    /// Starts Prometheus with its data and config in `dir`, scraping `target` (`host:port`)
    /// every second as job `infermem`, and waits until it is ready.
    pub fn start(dir: &Path, target: &str) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: infermem\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("dup log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect(
                "start /usr/bin/prometheus (Debian's `prometheus` package; .ci/run installs it)",
            );
        let server = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = format!("{}/-/ready", self.url);
        while agent().get(&url).call().map(|r| r.status().as_u16()).ok() != Some(200) {
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready after {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// An instant query: the result vector, or Prometheus's error (a query that does not
    /// parse, say).
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let mut response = agent()
            .get(format!("{}/api/v1/query", self.url))
            .query("query", expr)
            .call()
            .map_err(|e| format!("GET /api/v1/query: {e}"))?;
        let body: Value = serde_json::from_str(
            &response
                .body_mut()
                .read_to_string()
                .map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("not JSON: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits until `expr` returns a result that `accept` takes, or panics after `timeout`.
    pub fn query_until<T>(
        &self,
        expr: &str,
        timeout: Duration,
        mut accept: impl FnMut(&[Value]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut last = Ok(Vec::new());
        loop {
            if let Ok(result) = &last
                && let Some(found) = accept(result)
            {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{expr} did not return what was expected within {timeout:?}: {last:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
            last = self.query(expr);
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one sample of an instant-query result.
pub fn sample_value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a sample with a value: {sample}"))
}
