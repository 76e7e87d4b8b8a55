//! Alert hooks: a command (an argv list, no shell) and/or an `http://` webhook receive a
//! JSON object for each alert: a prediction turned critical, an OOM kill, thrashing, an
//! action applied, reverted or recommended.
//!
//! [`Hooks::fire`] never blocks: it queues the event for one worker thread
//! (`infermem-hooks`), which debounces it per (kind, target), then delivers it to each
//! configured sink with a timeout per attempt and bounded retries. A full queue drops the
//! event and counts it. The JSON delivered is the event's body with `kind`, `key`, `time`
//! (Unix seconds, when it was fired), `host` and, when earlier events of the same kind and
//! target were debounced away, `suppressed` (how many).

mod command;
mod debounce;
mod stop;
#[cfg(test)]
mod tests;
mod webhook;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::{self, Receiver, SyncSender},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::{debug, error, info, warn};

use self::{debounce::Debounce, stop::Stop, webhook::Webhook};
use crate::config::Interval;

/// The kinds of event: a prediction turned critical, an OOM kill, thrashing started, an
/// action applied, reverted or recommended.
pub const KINDS: [&str; 4] = ["critical", "oom_kill", "thrashing", "action"];

/// Events waiting for the worker; more are dropped (and counted).
const QUEUE: usize = 256;
/// The most retries a config may ask for.
const MAX_RETRIES: u32 = 10;
/// The longest wait between two attempts, as a multiple of `backoff`.
const MAX_BACKOFF_FACTOR: u32 = 8;
/// How long dropping [`Hooks`] waits for the worker (a webhook request cannot be cut short).
const JOIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often dropping [`Hooks`] looks whether the worker has ended.
const JOIN_POLL: Duration = Duration::from_millis(5);

/// `[hooks]`: what receives the alerts, which alerts, and how hard to try.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    /// A command run for each alert: its argv, with an absolute path first and no shell.
    /// The event JSON is on its stdin; exiting 0 is success. Empty: no command.
    pub command: Vec<String>,
    /// An `http://` URL the event JSON is POSTed to; any 2xx answer is success.
    pub webhook: Option<String>,
    /// The kinds of event delivered, of [`KINDS`] (default: all).
    pub events: Vec<String>,
    /// The same kind for the same target is delivered at most once in this window; the next
    /// one delivered says how many were suppressed.
    pub debounce: Interval,
    /// The limit of one attempt: the command is killed after it, the request given up.
    pub timeout: Interval,
    /// Attempts after a failed one (at most 10).
    pub retries: u32,
    /// The wait before the first retry; it doubles at each retry, up to 8 times this.
    pub backoff: Interval,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            command: Vec::new(),
            webhook: None,
            events: KINDS.iter().map(|&k| k.to_owned()).collect(),
            debounce: Interval(Duration::from_secs(60)),
            timeout: Interval(Duration::from_secs(10)),
            retries: 3,
            backoff: Interval(Duration::from_secs(1)),
        }
    }
}

impl HooksConfig {
    /// Checks what serde cannot: the command's argv, the webhook's URL, the event kinds and
    /// the number of retries. The message names the key.
    pub fn check(&self) -> Result<(), String> {
        command::check_argv(&self.command)?;
        if let Some(url) = &self.webhook {
            webhook::check_url(url)?;
        }
        if self.events.is_empty() {
            return Err(format!(
                "events is empty: list some of {KINDS:?}, or remove command and webhook"
            ));
        }
        if let Some(unknown) = self.events.iter().find(|e| !KINDS.contains(&e.as_str())) {
            return Err(format!(
                "events: {unknown:?} is not a kind of event (kinds: {KINDS:?})"
            ));
        }
        if self.retries > MAX_RETRIES {
            return Err(format!("retries = {}: at most {MAX_RETRIES}", self.retries));
        }
        Ok(())
    }
}

/// One alert: what happened (`kind`, one of [`KINDS`]), to what (`key`: `"host"`,
/// `"cgroup:/x"`, `"pid:1234:56789"`...), and its details (`body`, an object whose fields
/// are delivered beside `kind`, `key`, `time` and `host`).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertEvent {
    pub kind: String,
    pub key: String,
    pub body: Value,
}

/// Something that sees every alert as it is fired, whatever the hooks' kinds, debounce and
/// sinks (the OTLP export turns them into log records). It must not block.
pub trait AlertTap: Send + Sync {
    fn alert(&self, event: &AlertEvent);
}

/// What became of the events fired so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct HookStats {
    /// Deliveries that succeeded (one per sink: command, webhook).
    pub delivered: u64,
    /// Deliveries that failed after every retry.
    pub failed: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
    /// Events debounced away.
    pub suppressed: u64,
}

/// The counters behind [`HookStats`], shared with the worker.
#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    suppressed: AtomicU64,
}

/// The alert hooks: a queue, and the worker that delivers what it holds.
pub struct Hooks {
    events: Vec<String>,
    tap: Option<Arc<dyn AlertTap>>,
    counters: Arc<Counters>,
    stop: Arc<Stop>,
    worker: Option<Worker>,
}

/// The worker thread and its queue.
struct Worker {
    queue: SyncSender<Fired>,
    thread: JoinHandle<()>,
}

/// An event and when it was fired.
struct Fired {
    event: AlertEvent,
    at: Instant,
    unix_time: f64,
}

impl Hooks {
    /// Starts the worker thread `infermem-hooks`, unless the config has neither a command nor
    /// a webhook: then nothing runs and [`Hooks::fire`] does nothing. The config is expected
    /// to have passed [`HooksConfig::check`].
    pub fn start(config: HooksConfig) -> Hooks {
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(Stop::default());
        let events = config.events.clone();
        let sinks = Sinks::new(&config);
        let worker = if sinks.is_empty() {
            None
        } else {
            spawn_worker(config, sinks, Arc::clone(&counters), Arc::clone(&stop))
        };
        Hooks {
            events,
            tap: None,
            counters,
            stop,
            worker,
        }
    }

    /// The same hooks, with `tap` seeing every event fired.
    pub fn with_tap(mut self, tap: Option<Arc<dyn AlertTap>>) -> Hooks {
        self.tap = tap;
        self
    }

    /// Shows the event to the tap, then queues it for delivery, unless its kind is not
    /// wanted. Never blocks: when the queue is full the event is dropped and counted.
    pub fn fire(&self, event: AlertEvent) {
        if let Some(tap) = &self.tap {
            tap.alert(&event);
        }
        let Some(worker) = &self.worker else {
            return;
        };
        if !self.events.contains(&event.kind) {
            return;
        }
        let fired = Fired {
            event,
            at: Instant::now(),
            unix_time: crate::daemon::unix_now(),
        };
        if let Err(e) = worker.queue.try_send(fired) {
            let dropped = self.counters.dropped.fetch_add(1, Relaxed) + 1;
            if dropped.is_power_of_two() {
                let (why, fired) = match e {
                    mpsc::TrySendError::Full(f) => ("the queue is full", f),
                    mpsc::TrySendError::Disconnected(f) => ("the hook worker has ended", f),
                };
                let AlertEvent { kind, key, .. } = fired.event;
                warn!(kind, key, dropped, "alert dropped: {why}");
            }
        }
    }

    /// What became of the events fired so far.
    pub fn stats(&self) -> HookStats {
        let c = &self.counters;
        HookStats {
            delivered: c.delivered.load(Relaxed),
            failed: c.failed.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            suppressed: c.suppressed.load(Relaxed),
        }
    }
}

impl Drop for Hooks {
    /// Stops the worker: a running command is killed, queued events are discarded. Waits
    /// for it at most [`JOIN_TIMEOUT`] (a webhook request in flight runs to its timeout).
    fn drop(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        self.stop.set();
        drop(worker.queue);
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while !worker.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(JOIN_POLL);
        }
        if !worker.thread.is_finished() {
            warn!("the alert hook worker is still busy; it ends on its own after its request");
        } else if worker.thread.join().is_err() {
            error!("the alert hook worker panicked");
        }
    }
}

/// Spawns the worker; a failure is logged and leaves the hooks inert.
fn spawn_worker(
    config: HooksConfig,
    sinks: Sinks,
    counters: Arc<Counters>,
    stop: Arc<Stop>,
) -> Option<Worker> {
    let (queue, received) = mpsc::sync_channel(QUEUE);
    info!(command = config.command.first(), webhook = sinks.webhook.as_ref().map(Webhook::origin),
        events = ?config.events, "alert hooks started");
    let spawned = std::thread::Builder::new()
        .name("infermem-hooks".into())
        .spawn(move || {
            run(&config, &sinks, &received, &counters, &stop);
        });
    match spawned {
        Ok(thread) => Some(Worker { queue, thread }),
        Err(e) => {
            error!("cannot start the alert hook worker, alerts are not delivered: {e}");
            None
        }
    }
}

/// Where alerts go.
struct Sinks {
    command: Option<Vec<String>>,
    webhook: Option<Webhook>,
}

impl Sinks {
    fn new(config: &HooksConfig) -> Sinks {
        Sinks {
            command: (!config.command.is_empty()).then(|| config.command.clone()),
            webhook: config
                .webhook
                .as_deref()
                .map(|url| Webhook::new(url, config.timeout.0)),
        }
    }

    fn is_empty(&self) -> bool {
        self.command.is_none() && self.webhook.is_none()
    }
}

/// The worker: takes events off the queue until the hooks are dropped.
fn run(
    config: &HooksConfig,
    sinks: &Sinks,
    queue: &Receiver<Fired>,
    counters: &Counters,
    stop: &Stop,
) {
    let host = hostname();
    let mut debounce = Debounce::new(config.debounce.0);
    while let Ok(fired) = queue.recv() {
        if stop.is_set() {
            break;
        }
        let (kind, key) = (&fired.event.kind, &fired.event.key);
        let Some(suppressed) = debounce.admit(kind, key, fired.at) else {
            counters.suppressed.fetch_add(1, Relaxed);
            debug!(kind, key, "alert debounced");
            continue;
        };
        let json = render(fired, suppressed, &host);
        deliver(config, sinks, &json, counters, stop);
    }
    let discarded = queue.try_iter().count();
    if discarded > 0 {
        info!(discarded, "alert hooks stopped: queued alerts discarded");
    }
}

/// Sends one event to each sink, counting the outcome of each.
fn deliver(config: &HooksConfig, sinks: &Sinks, json: &Rendered, counters: &Counters, stop: &Stop) {
    let timeout = config.timeout.0;
    let outcomes = [
        sinks.command.as_ref().map(|argv| {
            let attempt = || command::run(argv, &json.bytes, timeout, stop);
            ("command", retry(config, stop, "command", json, attempt))
        }),
        sinks.webhook.as_ref().map(|hook| {
            let attempt = || hook.post(&json.bytes);
            ("webhook", retry(config, stop, "webhook", json, attempt))
        }),
    ];
    for (sink, outcome) in outcomes.into_iter().flatten() {
        let (kind, key) = (&json.kind, &json.key);
        match outcome {
            Ok(attempts) => {
                counters.delivered.fetch_add(1, Relaxed);
                info!(sink, kind, key, attempts, "alert delivered");
            }
            Err((attempts, why)) => {
                counters.failed.fetch_add(1, Relaxed);
                warn!(sink, kind, key, attempts, "alert not delivered: {why}");
            }
        }
    }
}

/// Makes `attempt` (delivering `json` to `sink`) until it succeeds, `config.retries`
/// retries fail, or the hooks stop. Returns the number of attempts, and with a failure the
/// last one's error.
fn retry(
    config: &HooksConfig,
    stop: &Stop,
    sink: &str,
    json: &Rendered,
    mut attempt: impl FnMut() -> Result<(), String>,
) -> Result<u32, (u32, String)> {
    let first = config.backoff.0;
    let (mut wait, mut n) = (first, 0);
    loop {
        n += 1;
        let why = match attempt() {
            Ok(()) => return Ok(n),
            Err(why) => why,
        };
        if n > config.retries {
            return Err((n, why));
        }
        let (kind, key) = (&json.kind, &json.key);
        info!(
            sink,
            kind, key, "alert attempt {n} failed, retrying in {wait:?}: {why}"
        );
        if stop.wait(wait) {
            return Err((n, format!("{why} (the hooks stopped before a retry)")));
        }
        wait = (wait * 2).min(first * MAX_BACKOFF_FACTOR);
    }
}

/// An event as delivered: its JSON (one line, ending in a newline), and what the log says.
struct Rendered {
    kind: String,
    key: String,
    bytes: Vec<u8>,
}

/// The delivered JSON object: the body's fields (a body that is not an object is under
/// `body`), then `kind`, `key`, `time`, `host` and, when above 0, `suppressed`; these win
/// over body fields of the same names.
fn render(fired: Fired, suppressed: u64, host: &str) -> Rendered {
    let AlertEvent { kind, key, body } = fired.event;
    let mut object = match body {
        Value::Object(fields) => fields,
        Value::Null => Map::new(),
        other => Map::from_iter([("body".to_owned(), other)]),
    };
    object.insert("kind".into(), kind.clone().into());
    object.insert("key".into(), key.clone().into());
    object.insert("time".into(), fired.unix_time.into());
    object.insert("host".into(), host.into());
    if suppressed > 0 {
        object.insert("suppressed".into(), suppressed.into());
    }
    let mut bytes = Value::Object(object).to_string().into_bytes();
    bytes.push(b'\n');
    Rendered { kind, key, bytes }
}

/// This machine's name, as the kernel has it.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|e| {
            warn!("cannot read the host name for alerts: {e}");
            "unknown".to_owned()
        })
}
