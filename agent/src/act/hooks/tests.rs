//! The hooks with real commands (`tee`, and shell scripts the tests write, run as argv
//! `["/bin/sh", script, ...]`) and a real HTTP receiver on a local port.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
};

use serde_json::json;

use super::*;

/// The longest any test waits for anything.
const PATIENCE: Duration = Duration::from_secs(10);

/// A fresh directory for one test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("infermem-hooks-{}-{name}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }

    /// A shell script in the directory, and the argv that runs it with `args`.
    fn script(&self, name: &str, body: &str, args: &[&str]) -> Vec<String> {
        let path = self.file(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        let argv = ["/bin/sh", &path].into_iter().chain(args.iter().copied());
        argv.map(str::to_owned).collect()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn ms(n: u64) -> Interval {
    Interval(Duration::from_millis(n))
}

/// A config for tests: short waits, no retries, a 1 ms debounce.
fn config(command: Vec<String>) -> HooksConfig {
    HooksConfig {
        command,
        debounce: ms(1),
        timeout: Interval(Duration::from_secs(5)),
        retries: 0,
        backoff: ms(10),
        ..HooksConfig::default()
    }
}

fn event(kind: &str, key: &str) -> AlertEvent {
    AlertEvent {
        kind: kind.into(),
        key: key.into(),
        body: json!({"level": "critical", "eta_seconds": 12.5, "reasons": ["memcg nearly full"]}),
    }
}

/// Waits (at most [`PATIENCE`]) until the stats satisfy `done`.
fn wait_for(hooks: &Hooks, done: impl Fn(&HookStats) -> bool) -> HookStats {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats = hooks.stats();
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "still waiting: {stats:?}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// The JSON objects in a file, one after the other.
fn read_events(path: &str) -> Vec<Value> {
    let bytes = fs::read(path).unwrap();
    serde_json::Deserializer::from_slice(&bytes)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Whether a process exists and is not a zombie.
fn alive(pid: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Waits (at most [`PATIENCE`]) for a file a command writes.
fn wait_for_file(path: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match fs::read_to_string(path) {
            Ok(text) if text.ends_with('\n') => return text,
            _ => assert!(Instant::now() < deadline, "{path} was not written"),
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn gethostname() -> String {
    let mut name = [0u8; 256];
    // SAFETY: the buffer is valid for its length.
    let rc = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    assert_eq!(rc, 0);
    let end = name.iter().position(|&b| b == 0).unwrap();
    String::from_utf8(name[..end].to_vec()).unwrap()
}

#[test]
fn a_command_gets_the_event_json_on_its_stdin() {
    let dir = TempDir::new("stdin");
    let out = dir.file("events");
    let hooks = Hooks::start(config(vec!["/usr/bin/tee".into(), out.clone()]));
    hooks.fire(event("critical", "pid:1234:56789"));
    let stats = wait_for(&hooks, |s| s.delivered == 1);
    assert_eq!(
        stats,
        HookStats {
            delivered: 1,
            ..HookStats::default()
        }
    );

    let bytes = fs::read(&out).unwrap();
    assert!(bytes.ends_with(b"}\n"), "one JSON line: {bytes:?}");
    let events = read_events(&out);
    assert_eq!(events.len(), 1);
    let got = &events[0];
    assert_eq!(got["kind"], "critical");
    assert_eq!(got["key"], "pid:1234:56789");
    assert_eq!(got["host"], gethostname().as_str());
    assert_eq!(got["level"], "critical");
    assert_eq!(got["eta_seconds"], 12.5);
    assert_eq!(got["reasons"], json!(["memcg nearly full"]));
    let age = crate::daemon::unix_now() - got["time"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&age), "time is {age} s ago");
    assert!(got.get("suppressed").is_none());
}

#[test]
fn a_failing_command_is_retried_with_backoff_until_it_succeeds() {
    let dir = TempDir::new("retry");
    let count = dir.file("count");
    // Attempts 1 and 2 fail; each attempt keeps the stdin it got.
    let body = r#"n=$(( $(cat "$1" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$1"
cat > "$1.$n"
[ "$n" -ge 3 ] || { echo "attempt $n fails" >&2; exit 1; }"#;
    let mut config = config(dir.script("flaky.sh", body, &[&count]));
    config.retries = 3;
    config.backoff = ms(50);
    let hooks = Hooks::start(config);
    let fired = Instant::now();
    hooks.fire(event("oom_kill", "pid:77"));
    let stats = wait_for(&hooks, |s| s.delivered + s.failed > 0);

    assert_eq!(
        stats,
        HookStats {
            delivered: 1,
            ..HookStats::default()
        }
    );
    assert!(
        fired.elapsed() >= Duration::from_millis(150),
        "waits 50 then 100 ms"
    );
    assert_eq!(fs::read_to_string(&count).unwrap(), "3\n");
    let inputs: Vec<Vec<Value>> = (1..=3)
        .map(|n| read_events(&format!("{count}.{n}")))
        .collect();
    assert_eq!(inputs[0].len(), 1);
    assert_eq!(inputs[0][0]["key"], "pid:77");
    assert!(inputs.iter().all(|input| *input == inputs[0]));
}

#[test]
fn a_command_that_always_fails_is_given_up_after_the_retries() {
    let dir = TempDir::new("give-up");
    let count = dir.file("count");
    let body = r#"n=$(( $(cat "$1" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$1"
exit 3"#;
    let mut config = config(dir.script("fails.sh", body, &[&count]));
    config.retries = 2;
    let hooks = Hooks::start(config);
    hooks.fire(event("thrashing", "host"));
    let stats = wait_for(&hooks, |s| s.failed > 0);

    assert_eq!(
        stats,
        HookStats {
            failed: 1,
            ..HookStats::default()
        }
    );
    thread::sleep(Duration::from_millis(100));
    assert_eq!(
        fs::read_to_string(&count).unwrap(),
        "3\n",
        "1 attempt + 2 retries"
    );
    assert_eq!(hooks.stats(), stats);
}

#[test]
fn a_command_past_its_timeout_is_killed_with_what_it_started() {
    let dir = TempDir::new("timeout");
    let pids = dir.file("pids");
    let body = r#"sleep 30 &
echo "$$ $!" > "$1"
wait"#;
    let mut config = config(dir.script("slow.sh", body, &[&pids]));
    config.timeout = ms(300);
    let hooks = Hooks::start(config);
    let fired = Instant::now();
    hooks.fire(event("critical", "host"));
    let stats = wait_for(&hooks, |s| s.failed > 0);
    let took = fired.elapsed();

    assert_eq!(
        stats,
        HookStats {
            failed: 1,
            ..HookStats::default()
        }
    );
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let pids = wait_for_file(&pids);
    let (shell, sleep) = pids.trim().split_once(' ').unwrap();
    assert!(
        !Path::new(&format!("/proc/{shell}")).exists(),
        "killed and reaped"
    );
    let deadline = Instant::now() + PATIENCE;
    while alive(sleep) {
        assert!(
            Instant::now() < deadline,
            "the command's child {sleep} lives on"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_failing_command_s_output_is_captured_and_bounded() {
    let dir = TempDir::new("output");
    let body = r#"echo "no route to the pager" >&2
head -c 200000 /dev/zero | tr '\0' x
exit 4"#;
    let argv = dir.script("loud.sh", body, &[]);
    let started = Instant::now();
    let why = command::run(&argv, b"{}\n", Duration::from_secs(5), &Stop::default()).unwrap_err();

    assert!(
        started.elapsed() < Duration::from_secs(5),
        "200 kB of output did not block it"
    );
    assert!(why.contains("exit status: 4"), "{why}");
    assert!(why.contains("no route to the pager"), "{why}");
    assert!(why.contains("[cut at 64 KiB]"), "{why}");
    assert!(
        why.len() < command::OUTPUT_LIMIT + 1024,
        "{} bytes",
        why.len()
    );
}

#[test]
fn a_command_that_cannot_start_is_a_failure() {
    let why = command::run(
        &["/nonexistent/infermem-page".to_owned()],
        b"{}\n",
        Duration::from_secs(5),
        &Stop::default(),
    )
    .unwrap_err();
    assert!(
        why.contains("cannot start /nonexistent/infermem-page"),
        "{why}"
    );
}

/// A request the test receiver got.
#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// An HTTP receiver on a local port: it answers one request per connection with each of
/// `statuses` in turn, sends what it got, and ends (at the latest after [`PATIENCE`]).
fn receiver(statuses: Vec<u16>) -> (String, mpsc::Receiver<Request>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    let (got, requests) = mpsc::channel();
    thread::spawn(move || {
        let deadline = Instant::now() + PATIENCE;
        for status in statuses {
            let mut stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                    Err(_) => return,
                }
            };
            let Ok(request) = answer(&mut stream, status) else {
                return;
            };
            let _ = got.send(request);
        }
    });
    (address, requests)
}

/// Reads one request from `stream` and answers `status`.
fn answer(stream: &mut TcpStream, status: u16) -> std::io::Result<Request> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let (method, path) = (
        words.next().unwrap_or("").to_owned(),
        words.next().unwrap_or("").to_owned(),
    );
    let (mut content_type, mut length) = (None, 0);
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        match name.to_ascii_lowercase().as_str() {
            "content-type" => content_type = Some(value.trim().to_owned()),
            "content-length" => length = value.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let text = format!("status {status}");
    write!(
        stream,
        "HTTP/1.1 {status} Test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    Ok(Request {
        method,
        path,
        content_type,
        body,
    })
}

#[test]
fn a_webhook_is_retried_until_it_answers_2xx_and_gets_what_the_command_gets() {
    let dir = TempDir::new("webhook");
    let out = dir.file("events");
    let (address, requests) = receiver(vec![500, 500, 200]);
    let mut config = config(vec!["/usr/bin/tee".into(), out.clone()]);
    config.webhook = Some(format!("http://{address}/hooks/s3cret"));
    config.retries = 3;
    let hooks = Hooks::start(config);
    hooks.fire(event("action", "cgroup:/model.slice:memory.low"));
    let stats = wait_for(&hooks, |s| s.delivered == 2);

    assert_eq!(
        stats,
        HookStats {
            delivered: 2,
            ..HookStats::default()
        }
    );
    let got: Vec<Request> = (0..3)
        .map(|_| requests.recv_timeout(PATIENCE).unwrap())
        .collect();
    let command_got = fs::read(&out).unwrap();
    for request in &got {
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/hooks/s3cret");
        assert_eq!(request.content_type.as_deref(), Some("application/json"));
        assert_eq!(request.body, command_got, "the same JSON");
    }
    let posted: Value = serde_json::from_slice(&got[2].body).unwrap();
    assert_eq!(posted["kind"], "action");
    assert_eq!(posted["key"], "cgroup:/model.slice:memory.low");
}

#[test]
fn a_webhook_answering_a_redirect_or_404_fails() {
    let (address, requests) = receiver(vec![302, 404]);
    let mut config = config(Vec::new());
    config.webhook = Some(format!("http://{address}/alerts"));
    config.retries = 1;
    let hooks = Hooks::start(config);
    hooks.fire(event("critical", "host"));
    let stats = wait_for(&hooks, |s| s.failed > 0);

    assert_eq!(
        stats,
        HookStats {
            failed: 1,
            ..HookStats::default()
        }
    );
    for _ in 0..2 {
        assert_eq!(requests.recv_timeout(PATIENCE).unwrap().path, "/alerts");
    }
}

#[test]
fn a_webhook_nobody_listens_on_fails() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = config(Vec::new());
    config.webhook = Some(format!("http://127.0.0.1:{port}/alerts"));
    config.retries = 1;
    let hooks = Hooks::start(config);
    hooks.fire(event("critical", "host"));
    let stats = wait_for(&hooks, |s| s.failed > 0);
    assert_eq!(
        stats,
        HookStats {
            failed: 1,
            ..HookStats::default()
        }
    );
}

#[test]
fn the_same_kind_and_key_is_debounced_and_the_next_says_how_many() {
    let dir = TempDir::new("debounce");
    let out = dir.file("events");
    let mut config = config(vec!["/usr/bin/tee".into(), "-a".into(), out.clone()]);
    config.debounce = ms(300);
    let hooks = Hooks::start(config);
    let first = Instant::now();
    for _ in 0..5 {
        hooks.fire(event("critical", "cgroup:/model"));
    }
    let stats = wait_for(&hooks, |s| s.delivered == 1 && s.suppressed == 4);
    assert_eq!(
        stats,
        HookStats {
            delivered: 1,
            suppressed: 4,
            ..HookStats::default()
        }
    );

    thread::sleep((first + Duration::from_millis(400)).saturating_duration_since(Instant::now()));
    hooks.fire(event("critical", "cgroup:/model"));
    wait_for(&hooks, |s| s.delivered == 2);
    let events = read_events(&out);
    assert_eq!(events.len(), 2);
    assert!(events[0].get("suppressed").is_none());
    assert_eq!(events[1]["suppressed"], 4);
    assert_eq!(events[1]["key"], "cgroup:/model");
}

#[test]
fn different_keys_or_kinds_are_not_debounced_together() {
    let dir = TempDir::new("keys");
    let out = dir.file("events");
    let mut config = config(vec!["/usr/bin/tee".into(), "-a".into(), out.clone()]);
    config.debounce = Interval(Duration::from_secs(60));
    let hooks = Hooks::start(config);
    let fired = [
        ("critical", "pid:1:1"),
        ("critical", "pid:2:2"),
        ("thrashing", "pid:1:1"),
    ];
    for (kind, key) in fired
        .into_iter()
        .chain([("critical", "pid:1:1"), ("critical", "pid:2:2")])
    {
        hooks.fire(event(kind, key));
    }
    let stats = wait_for(&hooks, |s| s.delivered == 3 && s.suppressed == 2);
    assert_eq!(
        stats,
        HookStats {
            delivered: 3,
            suppressed: 2,
            ..HookStats::default()
        }
    );

    let events = read_events(&out);
    let got: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["key"].as_str().unwrap()))
        .collect();
    assert_eq!(got, fired);
}

#[test]
fn only_the_configured_kinds_are_delivered() {
    let dir = TempDir::new("events");
    let out = dir.file("events");
    let mut config = config(vec!["/usr/bin/tee".into(), "-a".into(), out.clone()]);
    config.events = vec!["oom_kill".into()];
    let hooks = Hooks::start(config);
    hooks.fire(event("critical", "host"));
    hooks.fire(event("action", "pin:1:2:manual"));
    hooks.fire(event("oom_kill", "pid:9"));
    // Events are delivered in order: the last one delivered, nothing before it was queued.
    let stats = wait_for(&hooks, |s| s.delivered == 1);
    assert_eq!(
        stats,
        HookStats {
            delivered: 1,
            ..HookStats::default()
        }
    );

    let events = read_events(&out);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["kind"], "oom_kill");
}

#[test]
fn a_full_queue_drops_and_dropping_the_hooks_kills_the_running_command() {
    let dir = TempDir::new("full");
    let pid = dir.file("pid");
    let mut config = config(dir.script("block.sh", "echo $$ > \"$1\"\nexec sleep 30", &[&pid]));
    config.timeout = Interval(Duration::from_secs(60));
    let hooks = Hooks::start(config);
    let started = Instant::now();
    for n in 0..300 {
        hooks.fire(event("critical", &format!("pid:{n}:1")));
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "fire does not block"
    );
    let stats = hooks.stats();
    assert!(stats.dropped >= 300 - QUEUE as u64 - 1, "{stats:?}");

    let pid = wait_for_file(&pid);
    let pid = pid.trim();
    assert!(alive(pid));
    let dropping = Instant::now();
    drop(hooks);
    assert!(
        dropping.elapsed() < Duration::from_secs(1),
        "{:?}",
        dropping.elapsed()
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "killed and reaped"
    );
}

#[test]
fn without_command_or_webhook_nothing_runs() {
    let hooks = Hooks::start(HooksConfig::default());
    assert!(hooks.worker.is_none());
    hooks.fire(event("critical", "host"));
    assert_eq!(hooks.stats(), HookStats::default());
}

#[test]
fn the_delivered_object_keeps_its_own_fields_first() {
    let fired = |body| Fired {
        event: AlertEvent {
            kind: "action".into(),
            key: "k".into(),
            body,
        },
        at: Instant::now(),
        unix_time: 1.5,
    };
    let parse = |r: Rendered| serde_json::from_slice::<Value>(&r.bytes).unwrap();

    let got = parse(render(fired(json!({"kind": "pin", "id": 7})), 3, "box"));
    assert_eq!(
        got,
        json!({"kind": "action", "key": "k", "time": 1.5, "host": "box", "id": 7, "suppressed": 3})
    );
    let got = parse(render(fired(json!([1, 2])), 0, "box"));
    assert_eq!(
        got,
        json!({"kind": "action", "key": "k", "time": 1.5, "host": "box", "body": [1, 2]})
    );
    let got = parse(render(fired(Value::Null), 0, "box"));
    assert_eq!(
        got,
        json!({"kind": "action", "key": "k", "time": 1.5, "host": "box"})
    );
}

#[test]
fn the_config_reads_from_toml_and_defaults_to_every_kind() {
    let config: HooksConfig = toml::from_str(
        r#"command = ["/usr/local/bin/page", "--json"]
webhook = "http://127.0.0.1:9000/alerts"
events = ["critical", "oom_kill"]
debounce = "250ms"
timeout = "2s"
retries = 5
backoff = "100ms""#,
    )
    .unwrap();
    assert_eq!(config.command, ["/usr/local/bin/page", "--json"]);
    assert_eq!(
        config.webhook.as_deref(),
        Some("http://127.0.0.1:9000/alerts")
    );
    assert_eq!(config.events, ["critical", "oom_kill"]);
    assert_eq!(config.debounce, ms(250));
    assert_eq!(
        (config.timeout, config.retries, config.backoff),
        (ms(2000), 5, ms(100))
    );
    assert_eq!(config.check(), Ok(()));

    let defaults = HooksConfig::default();
    assert_eq!(defaults.events, KINDS);
    assert_eq!(
        (defaults.debounce, defaults.timeout, defaults.retries),
        (ms(60_000), ms(10_000), 3)
    );
    assert_eq!(defaults.check(), Ok(()));
    assert!(toml::from_str::<HooksConfig>("comand = [\"/bin/true\"]").is_err());
}

#[test]
fn the_config_check_rejects_what_cannot_work() {
    let rejects = |change: &dyn Fn(&mut HooksConfig), expected: &str| {
        let mut config = HooksConfig::default();
        change(&mut config);
        let why = config.check().unwrap_err();
        assert!(why.contains(expected), "{why:?} lacks {expected:?}");
    };
    let webhook = |url: &'static str| move |c: &mut HooksConfig| c.webhook = Some(url.into());
    rejects(
        &webhook("https://hooks.example.com/x"),
        "https is not supported",
    );
    rejects(&webhook("ftp://example.com/x"), "must be an http:// URL");
    rejects(&webhook("example.com/x"), "must be an http:// URL");
    rejects(&webhook("http://"), "webhook");
    rejects(
        &|c| c.events = vec!["critical".into(), "disk".into()],
        "\"disk\" is not a kind",
    );
    rejects(&|c| c.events.clear(), "events is empty");
    rejects(&|c| c.command = vec![String::new()], "command[0] is empty");
    rejects(
        &|c| c.command = vec!["notify-send".into()],
        "not an absolute path",
    );
    rejects(
        &|c| c.command = vec!["/bin/echo".into(), "a\0b".into()],
        "command[1] contains a NUL",
    );
    rejects(&|c| c.retries = 11, "at most 10");
}

/// Keeps the keys of the events it sees.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<String>>);

impl AlertTap for Recorder {
    fn alert(&self, event: &AlertEvent) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{}:{}", event.kind, event.key));
    }
}

#[test]
fn the_tap_sees_every_event_without_sinks_filters_or_debounce() {
    let recorder = Arc::new(Recorder::default());
    let config = HooksConfig {
        events: vec!["oom_kill".into()],
        ..HooksConfig::default()
    };
    let tap: Arc<dyn AlertTap> = Arc::clone(&recorder) as Arc<dyn AlertTap>;
    let hooks = Hooks::start(config).with_tap(Some(tap));
    for _ in 0..2 {
        hooks.fire(event("critical", "host"));
    }
    hooks.fire(event("action", "cgroup:/srv:memory.low"));
    assert_eq!(
        *recorder.0.lock().unwrap(),
        [
            "critical:host",
            "critical:host",
            "action:cgroup:/srv:memory.low"
        ]
    );
    assert_eq!(
        hooks.stats(),
        HookStats::default(),
        "no sink: nothing delivered"
    );
}
