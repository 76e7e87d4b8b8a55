//! The API's server: binds the unix socket, tells who connects (peer credentials and the admin
//! group), and answers one request per connection, or streams `watch` updates, from a
//! [`Service`].

use std::{
    fs::{self, DirBuilder, Permissions},
    io,
    os::unix::{
        fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
        net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{UnixListener, UnixStream},
    sync::{Semaphore, watch},
    task::{JoinError, JoinSet},
    time::MissedTickBehavior,
};

use super::{
    Peer, Service, WatchTarget, error,
    proto::{self, request, response, watch_request},
    wire::{self, WireError},
};

/// The socket's mode unless configured otherwise: the owner (root) and its group.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Connections served at once; the next ones are answered `unavailable` and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may leave a response unread before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The period of `watch` updates.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// The bounds of an inspect's sampling window.
const INSPECT_MIN: Duration = Duration::from_millis(100);
const INSPECT_MAX: Duration = Duration::from_secs(60);
/// The pause after a failed accept (out of file descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How the server decides what each caller sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerOptions {
    /// Members of this group (primary or supplementary) see every process, as root does.
    pub admin_gid: Option<u32>,
}

/// A bound API socket, ready for [`serve`]. Dropping it removes the socket file, unless
/// another socket has replaced it since.
#[derive(Debug)]
pub struct Listener {
    listener: StdUnixListener,
    socket: SocketFile,
}

/// The socket file this process bound, removed on drop if it is still the same file.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| meta.dev() == self.dev && meta.ino() == self.ino);
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds the API socket at `path`: creates its parent directory (0755) if missing, replaces a
/// stale socket (never a file of another type, nor a socket a live agent answers on), then
/// sets the socket's `mode` (see [`DEFAULT_SOCKET_MODE`]) and, when `group` is given, its group
/// (its owner stays the agent's user: root).
pub fn bind(path: &Path, group: Option<u32>, mode: u32) -> io::Result<Listener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| context(e, "creating", parent))?;
    }
    remove_stale(path)?;
    let listener = StdUnixListener::bind(path).map_err(|e| context(e, "binding", path))?;
    let meta = fs::symlink_metadata(path)?;
    let socket = SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    fs::set_permissions(path, Permissions::from_mode(mode))
        .map_err(|e| context(e, "setting the mode of", path))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| context(e, "setting the group of", path))?;
    }
    listener.set_nonblocking(true)?;
    Ok(Listener { listener, socket })
}

/// Removes a socket left at `path` by an agent that is gone; refuses any other file, and a
/// socket that still answers.
fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(context(e, "reading", path)),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket: not replacing it",
                path.display()
            ),
        ));
    }
    match StdUnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another infermem run is listening on {}", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(|e| context(e, "removing the stale socket", path))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(context(e, "probing the existing socket", path)),
    }
}

/// `e`, with what was being done to which path.
fn context(e: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{doing} {}: {e}", path.display()))
}

/// Serves the API on `listener` until `shutdown` turns true (or its sender is dropped), then
/// ends the open connections and removes the socket file. A connection's error or panic ends
/// that connection only. Needs a tokio runtime with I/O and time enabled (either flavour);
/// fails only when the listener cannot join it.
pub async fn serve<S: Service>(
    listener: Listener,
    service: Arc<S>,
    options: ServerOptions,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let Listener {
        listener,
        socket: _socket,
    } = listener;
    let listener = UnixListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    while !*shutdown.borrow_and_update() {
        tokio::select! {
            changed = shutdown.changed() => if changed.is_err() { break },
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    admit(stream, &slots, &mut connections, &service, options);
                }
                Err(e) => {
                    tracing::warn!("api: accepting a connection: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => log_end(done),
        }
    }
    connections.shutdown().await;
    Ok(())
}

/// Serves `stream` on a task of its own when a slot is free; answers `unavailable` otherwise.
fn admit<S: Service>(
    stream: UnixStream,
    slots: &Arc<Semaphore>,
    connections: &mut JoinSet<()>,
    service: &Arc<S>,
    options: ServerOptions,
) {
    let Ok(slot) = Arc::clone(slots).try_acquire_owned() else {
        refuse(&stream);
        return;
    };
    let service = Arc::clone(service);
    connections.spawn(async move {
        let _slot = slot;
        if let Err(e) = handle(stream, service, options).await {
            tracing::debug!("api: connection: {e}");
        }
    });
}

/// Tells a client over [`MAX_CONNECTIONS`] to come back later, without waiting on it.
fn refuse(stream: &UnixStream) {
    let busy = error(
        "unavailable",
        format!("the agent is serving {MAX_CONNECTIONS} connections: try again shortly"),
    );
    if let Ok(buf) = wire::encode(&reply(Err(busy))) {
        let _ = stream.try_write(&buf);
    }
}

/// Logs a connection task that panicked.
fn log_end(done: Result<(), JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!("api: a connection's task panicked: {e}");
    }
}

/// One connection: who it is, its request, and the answer.
async fn handle<S: Service>(
    mut stream: UnixStream,
    service: Arc<S>,
    options: ServerOptions,
) -> Result<(), WireError> {
    let peer = peer(&stream, options.admin_gid)?;
    let request =
        match wire::read_message::<proto::Request, _>(&mut stream, Some(REQUEST_TIMEOUT)).await {
            Ok(Some(request)) => request,
            Ok(None) => return Ok(()),
            Err(e @ (WireError::Decode(_) | WireError::TooLarge(_) | WireError::BadLength)) => {
                let unreadable = error("bad_request", format!("unreadable request: {e}"));
                return send(&mut stream, Err(unreadable)).await;
            }
            Err(e) => return Err(e),
        };
    let answer = match request.kind {
        None => Err(error("bad_request", "the request names no command")),
        Some(request::Kind::Ps(_)) => blocking(&service, move |s| s.ps(&peer))
            .await
            .map(response::Kind::Ps),
        Some(request::Kind::Status(_)) => blocking(&service, move |s| s.status(&peer))
            .await
            .map(response::Kind::Status),
        Some(request::Kind::Inspect(r)) => service
            .inspect(&peer, r.pid, inspect_duration(r.duration_ms))
            .await
            .map(response::Kind::Inspect),
        Some(request::Kind::Watch(r)) => return stream_watch(&mut stream, &service, peer, r).await,
        Some(request::Kind::Actions(_)) => blocking(&service, move |s| s.actions(&peer))
            .await
            .and_then(|r| r.map(response::Kind::Actions)),
        Some(request::Kind::Revert(_)) => blocking(&service, move |s| s.revert(&peer))
            .await
            .and_then(|r| r.map(response::Kind::Act)),
        Some(request::Kind::Pin(r)) => blocking(&service, move |s| s.pin(&peer, r, true))
            .await
            .and_then(|r| r.map(response::Kind::Act)),
        Some(request::Kind::Unpin(r)) => blocking(&service, move |s| s.pin(&peer, r, false))
            .await
            .and_then(|r| r.map(response::Kind::Act)),
    };
    send(&mut stream, answer).await
}

/// Sends `watch` updates every [`WATCH_INTERVAL`] until the target ends, the service fails or
/// the client goes away (a write fails).
async fn stream_watch<S: Service>(
    stream: &mut UnixStream,
    service: &Arc<S>,
    peer: Peer,
    request: proto::WatchRequest,
) -> Result<(), WireError> {
    let Some(mut target) = watch_target(request) else {
        return send(
            stream,
            Err(error("bad_request", "the watch names no target")),
        )
        .await;
    };
    let mut ticks = tokio::time::interval(WATCH_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let polled = blocking(service, move |s| {
            let update = s.watch(&peer, &mut target);
            (update, target)
        })
        .await;
        let update = match polled {
            Ok((Ok(update), next)) => {
                target = next;
                update
            }
            Ok((Err(e), _)) | Err(e) => return send(stream, Err(e)).await,
        };
        let ended = update.ended;
        send(stream, Ok(response::Kind::Watch(update))).await?;
        if ended {
            return Ok(());
        }
    }
}

/// What a watch request follows; `None` when it names nothing.
fn watch_target(request: proto::WatchRequest) -> Option<WatchTarget> {
    Some(match request.target? {
        watch_request::Target::Pid(pid) => WatchTarget::Pid {
            pid,
            start_time: None,
        },
        watch_request::Target::Cgroup(path) => WatchTarget::Cgroup(path),
        watch_request::Target::Host(_) => WatchTarget::Host,
    })
}

/// The sampling window an inspect asked for, within [`INSPECT_MIN`]..=[`INSPECT_MAX`].
fn inspect_duration(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms)).clamp(INSPECT_MIN, INSPECT_MAX)
}

/// Runs a synchronous [`Service`] method off the runtime's threads (it takes the agent's
/// locks); a panic in it becomes an `internal` error.
async fn blocking<S: Service, T: Send + 'static>(
    service: &Arc<S>,
    call: impl FnOnce(&S) -> T + Send + 'static,
) -> Result<T, proto::Error> {
    let service = Arc::clone(service);
    tokio::task::spawn_blocking(move || call(&service))
        .await
        .map_err(|e| error("internal", format!("the agent failed to answer: {e}")))
}

/// The response carrying `answer`.
fn reply(answer: Result<response::Kind, proto::Error>) -> proto::Response {
    proto::Response {
        kind: Some(answer.unwrap_or_else(response::Kind::Error)),
    }
}

/// Writes one response, giving up on a client that does not read it.
async fn send(
    stream: &mut UnixStream,
    answer: Result<response::Kind, proto::Error>,
) -> Result<(), WireError> {
    wire::write_message(stream, &reply(answer), Some(WRITE_TIMEOUT)).await
}

/// The caller behind `stream`, from its peer credentials.
fn peer(stream: &UnixStream, admin_gid: Option<u32>) -> io::Result<Peer> {
    let cred = stream.peer_cred()?;
    let groups = cred
        .pid()
        .and_then(|pid| fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|status| supplementary_groups(&status, cred.uid()))
        .unwrap_or_default();
    let credentials = Credentials {
        uid: cred.uid(),
        gid: cred.gid(),
        groups,
    };
    Ok(Peer {
        uid: credentials.uid,
        gid: credentials.gid,
        sees_all: sees_all(&credentials, admin_gid),
    })
}

/// A caller's identity: its user, primary group and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Whether a caller sees every process: root, or a member of the admin group.
pub fn sees_all(credentials: &Credentials, admin_gid: Option<u32>) -> bool {
    credentials.uid == 0
        || admin_gid
            .is_some_and(|admin| credentials.gid == admin || credentials.groups.contains(&admin))
}

/// The `Groups:` of a `/proc/<pid>/status`, provided its effective uid is `uid`: the pid may
/// belong to another process than the one that connected, and then gives no groups.
fn supplementary_groups(status: &str, uid: u32) -> Option<Vec<u32>> {
    let field = |name: &str| status.lines().find_map(|line| line.strip_prefix(name));
    let euid: u32 = field("Uid:")?.split_whitespace().nth(1)?.parse().ok()?;
    if euid != uid {
        return None;
    }
    field("Groups:")?
        .split_whitespace()
        .map(|g| g.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests;
