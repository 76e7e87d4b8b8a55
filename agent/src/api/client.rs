//! The API's client, for the thin commands (`ps`, `status`, `watch`, `inspect`): finds the
//! agent on its socket, sends one request per connection and reads the answer.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::net::UnixStream;

use super::{
    WatchTarget,
    proto::{self, request, response, watch_request},
    wire::{self, WireError},
};

/// How long connecting to the socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a reply may take (inspect: on top of its sampling window), and how long a watch
/// may go without an update.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long sending a request may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket exists but the caller may not connect; the message says how to get access.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("connecting to the agent on {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    /// The agent was there for an earlier request of this client, and is gone.
    #[error("the agent on {0} stopped")]
    Stopped(PathBuf),
    #[error("talking to the agent: {0}")]
    Wire(#[from] WireError),
    #[error("the agent closed the connection without answering")]
    Closed,
    /// The agent answered with an API error.
    #[error("{}: {}", .0.kind, .0.message)]
    Api(proto::Error),
    /// The agent answered with another kind of response than the request's.
    #[error("the agent answered {0} with an unexpected response")]
    Unexpected(&'static str),
}

/// How a watch stream ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The last update said the target ended (see its `end_reason`).
    TargetEnded,
    /// The agent closed the stream (it is shutting down).
    AgentClosed,
}

/// A connection to the agent's API. Each request uses a connection of its own: the first the
/// one [`Client::connect`] opened, the next ones new ones.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    stream: Option<UnixStream>,
}

impl Client {
    /// Connects to the agent on `path`: `Ok(None)` when none runs there (no socket, or nobody
    /// listening on it); an error when the caller may not connect, with how to get access.
    pub async fn connect(path: &Path) -> Result<Option<Client>, ClientError> {
        Ok(open(path).await?.map(|stream| Client {
            path: path.to_owned(),
            stream: Some(stream),
        }))
    }

    /// The AI workloads the caller may see.
    pub async fn ps(&mut self) -> Result<proto::PsReply, ClientError> {
        let request = request::Kind::Ps(proto::PsRequest {});
        match self.call(request, REPLY_TIMEOUT).await? {
            response::Kind::Ps(reply) => Ok(reply),
            _ => Err(ClientError::Unexpected("ps")),
        }
    }

    /// The host, its memory cgroups and recent OOM kills.
    pub async fn status(&mut self) -> Result<proto::StatusReply, ClientError> {
        let request = request::Kind::Status(proto::StatusRequest {});
        match self.call(request, REPLY_TIMEOUT).await? {
            response::Kind::Status(reply) => Ok(reply),
            _ => Err(ClientError::Unexpected("status")),
        }
    }

    /// The policy's mode, the actions in force and wished for, the pins.
    pub async fn actions(&mut self) -> Result<proto::ActionsReply, ClientError> {
        let request = request::Kind::Actions(proto::ActionsRequest {});
        match self.call(request, REPLY_TIMEOUT).await? {
            response::Kind::Actions(reply) => Ok(reply),
            _ => Err(ClientError::Unexpected("actions")),
        }
    }

    /// Undoes every action in force.
    pub async fn revert(&mut self) -> Result<proto::ActReply, ClientError> {
        let request = request::Kind::Revert(proto::RevertRequest {});
        self.act(request, "revert").await
    }

    /// Pins (or, `pin` false, unpins) a process's model files or one file.
    pub async fn pin(
        &mut self,
        request: proto::PinRequest,
        pin: bool,
    ) -> Result<proto::ActReply, ClientError> {
        if pin {
            self.act(request::Kind::Pin(request), "pin").await
        } else {
            self.act(request::Kind::Unpin(request), "unpin").await
        }
    }

    async fn act(
        &mut self,
        request: request::Kind,
        what: &'static str,
    ) -> Result<proto::ActReply, ClientError> {
        // Pinning faults a whole file in: give it the agent's own limit.
        let timeout = crate::daemon::actions::REPLY_TIMEOUT + REPLY_TIMEOUT;
        match self.call(request, timeout).await? {
            response::Kind::Act(reply) => Ok(reply),
            _ => Err(ClientError::Unexpected(what)),
        }
    }

    /// The inspect report of `pid` after sampling it for `duration` (the agent keeps it
    /// within 100 ms..=60 s).
    pub async fn inspect(
        &mut self,
        pid: u32,
        duration: Duration,
    ) -> Result<proto::InspectReply, ClientError> {
        let request = request::Kind::Inspect(proto::InspectRequest {
            pid,
            duration_ms: u32::try_from(duration.as_millis()).unwrap_or(u32::MAX),
        });
        match self.call(request, duration + REPLY_TIMEOUT).await? {
            response::Kind::Inspect(reply) => Ok(reply),
            _ => Err(ClientError::Unexpected("inspect")),
        }
    }

    /// Follows `target` (a pid's `start_time` is not sent: the agent pins the process itself),
    /// calling `on_update` with each update, until the target ends or the agent closes the
    /// stream. An update is expected at least every 30 s.
    pub async fn watch(
        &mut self,
        target: &WatchTarget,
        mut on_update: impl FnMut(&proto::WatchUpdate),
    ) -> Result<WatchEnd, ClientError> {
        let mut stream = self
            .send(request::Kind::Watch(watch_request(target)))
            .await?;
        loop {
            let Some(response) = wire::read_message(&mut stream, Some(REPLY_TIMEOUT)).await? else {
                return Ok(WatchEnd::AgentClosed);
            };
            match answer(response)? {
                response::Kind::Watch(update) => {
                    on_update(&update);
                    if update.ended {
                        return Ok(WatchEnd::TargetEnded);
                    }
                }
                _ => return Err(ClientError::Unexpected("watch")),
            }
        }
    }

    /// Sends `request` and reads its one response, within `timeout`.
    async fn call(
        &mut self,
        request: request::Kind,
        timeout: Duration,
    ) -> Result<response::Kind, ClientError> {
        let mut stream = self.send(request).await?;
        let response = wire::read_message(&mut stream, Some(timeout))
            .await?
            .ok_or(ClientError::Closed)?;
        answer(response)
    }

    /// Sends `request` on this client's unused connection, or a new one.
    async fn send(&mut self, request: request::Kind) -> Result<UnixStream, ClientError> {
        let mut stream = match self.stream.take() {
            Some(stream) => stream,
            None => open(&self.path)
                .await?
                .ok_or_else(|| ClientError::Stopped(self.path.clone()))?,
        };
        let request = proto::Request {
            kind: Some(request),
        };
        match wire::write_message(&mut stream, &request, Some(SEND_TIMEOUT)).await {
            // An agent too busy to serve answers and closes at once: its answer is to be read.
            Err(WireError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(stream),
            sent => sent.map(|()| stream).map_err(ClientError::from),
        }
    }
}

/// The request naming `target`.
fn watch_request(target: &WatchTarget) -> proto::WatchRequest {
    let target = match target {
        WatchTarget::Pid { pid, .. } => watch_request::Target::Pid(*pid),
        WatchTarget::Cgroup(path) => watch_request::Target::Cgroup(path.clone()),
        WatchTarget::Host => watch_request::Target::Host(true),
    };
    proto::WatchRequest {
        target: Some(target),
    }
}

/// A response's content, or its API error.
fn answer(response: proto::Response) -> Result<response::Kind, ClientError> {
    match response.kind {
        Some(response::Kind::Error(e)) => Err(ClientError::Api(e)),
        Some(kind) => Ok(kind),
        None => Err(ClientError::Unexpected("a request")),
    }
}

/// Connects to the socket at `path`; `None` when no agent is there.
async fn open(path: &Path) -> Result<Option<UnixStream>, ClientError> {
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| WireError::Timeout(CONNECT_TIMEOUT))?;
    match connected {
        Ok(stream) => Ok(Some(stream)),
        Err(e) => match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => Ok(None),
            io::ErrorKind::PermissionDenied => {
                Err(ClientError::PermissionDenied(permission_help(path)))
            }
            _ => Err(ClientError::Connect {
                path: path.to_owned(),
                source: e,
            }),
        },
    }
}

/// What to do about a socket the caller may not connect to.
fn permission_help(path: &Path) -> String {
    let Ok(meta) = fs::metadata(path) else {
        return format!(
            "permission denied on {}: ask for access to it or run as root",
            path.display()
        );
    };
    let etc_group = fs::read_to_string("/etc/group").unwrap_or_default();
    let group = group_name(&etc_group, meta.gid()).map_or(meta.gid().to_string(), str::to_owned);
    format!(
        "permission denied on {}: the socket is mode {:04o}: ask to be added to group {group} \
         or run as root",
        path.display(),
        meta.mode() & 0o7777,
    )
}

/// The name of group `gid` in an `/etc/group` text.
fn group_name(etc_group: &str, gid: u32) -> Option<&str> {
    etc_group.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?.parse::<u32>().ok()?;
        (id == gid).then_some(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_come_from_etc_group() {
        let etc_group = "root:x:0:\n# comment\nbroken\ninfermem:x:990:alice,bob\n";
        assert_eq!(group_name(etc_group, 990), Some("infermem"));
        assert_eq!(group_name(etc_group, 0), Some("root"));
        assert_eq!(group_name(etc_group, 5), None);
    }

    #[test]
    fn watch_requests_name_their_target() {
        let pid = WatchTarget::Pid {
            pid: 12,
            start_time: Some(99),
        };
        assert_eq!(
            watch_request(&pid).target,
            Some(watch_request::Target::Pid(12))
        );
        assert_eq!(
            watch_request(&WatchTarget::Cgroup("/a.slice".into())).target,
            Some(watch_request::Target::Cgroup("/a.slice".into()))
        );
        assert_eq!(
            watch_request(&WatchTarget::Host).target,
            Some(watch_request::Target::Host(true))
        );
    }

    #[test]
    fn permission_help_names_the_mode_and_group() {
        let path = std::env::temp_dir().join(format!("infermem-perm-{}", std::process::id()));
        fs::write(&path, "").unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o660)).unwrap();
        let help = permission_help(&path);
        fs::remove_file(&path).unwrap();
        assert!(
            help.contains("the socket is mode 0660: ask to be added to group "),
            "{help}"
        );
        assert!(help.ends_with(" or run as root"), "{help}");
    }

    #[tokio::test]
    async fn no_socket_means_no_agent() {
        let path = std::env::temp_dir().join(format!("infermem-none-{}.sock", std::process::id()));
        assert!(Client::connect(&path).await.unwrap().is_none());
    }
}
