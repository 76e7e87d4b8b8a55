use std::{
    process,
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio::io::AsyncWriteExt;

use super::*;
use crate::api::client::{Client, ClientError, WatchEnd};

/// A test-only stand-in for the agent's service: one workload, a status that panics, and
/// watches that end on their second update (counted in the target's `start_time`, which
/// the server must keep between ticks).
struct Stub;

impl Service for Stub {
    fn ps(&self, peer: &Peer) -> proto::PsReply {
        proto::PsReply {
            workloads: vec![proto::Workload {
                pid: 7,
                uid: peer.uid,
                comm: "llama-server".into(),
                ..Default::default()
            }],
            daemon: None,
        }
    }

    fn status(&self, _peer: &Peer) -> proto::StatusReply {
        panic!("a bug in the service");
    }

    fn watch(
        &self,
        _peer: &Peer,
        target: &mut WatchTarget,
    ) -> Result<proto::WatchUpdate, proto::Error> {
        let label = target.label();
        let WatchTarget::Pid { start_time, .. } = target else {
            return Err(error("no_such_process", "only pids here"));
        };
        let n = start_time.map_or(1, |n| n + 1);
        *start_time = Some(n);
        Ok(proto::WatchUpdate {
            ts: n as f64,
            target: label,
            ended: n == 2,
            end_reason: if n == 2 {
                "exited".into()
            } else {
                String::new()
            },
            ..Default::default()
        })
    }

    fn actions(&self, _peer: &Peer) -> Result<proto::ActionsReply, proto::Error> {
        Err(error("unavailable", "the stub has no actions"))
    }

    fn revert(&self, _peer: &Peer) -> Result<proto::ActReply, proto::Error> {
        Err(error("unavailable", "the stub has no actions"))
    }

    fn pin(
        &self,
        _peer: &Peer,
        _request: proto::PinRequest,
        _pin: bool,
    ) -> Result<proto::ActReply, proto::Error> {
        Err(error("unavailable", "the stub has no actions"))
    }

    async fn inspect(
        &self,
        _peer: &Peer,
        pid: u32,
        duration: Duration,
    ) -> Result<proto::InspectReply, proto::Error> {
        if pid == 0 {
            return Err(error("no_such_process", "no pid 0"));
        }
        Ok(proto::InspectReply {
            report_json: format!("{pid} {}", duration.as_millis()),
        })
    }
}

/// A fresh directory for one test's socket, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("infermem-api-{}-{name}-{n}", process::id()));
        let _ = fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Serves the stub on `path`; the sender stops it.
fn start(path: &Path) -> (watch::Sender<bool>, tokio::task::JoinHandle<io::Result<()>>) {
    let listener = bind(path, None, DEFAULT_SOCKET_MODE).unwrap();
    let (stop, shutdown) = watch::channel(false);
    let server = tokio::spawn(serve(
        listener,
        Arc::new(Stub),
        ServerOptions::default(),
        shutdown,
    ));
    (stop, server)
}

#[tokio::test]
async fn serves_ps_inspect_and_a_watch_to_its_end_then_removes_the_socket() {
    let dir = TempDir::new("serve");
    let path = dir.0.join("run/infermem.sock");
    let (stop, server) = start(&path);
    let mode = fs::metadata(&path).unwrap().mode() & 0o777;
    assert_eq!(mode, DEFAULT_SOCKET_MODE);

    let mut client = Client::connect(&path).await.unwrap().expect("the agent");
    let ps = client.ps().await.unwrap();
    assert_eq!(ps.workloads.len(), 1);
    assert_eq!(ps.workloads[0].comm, "llama-server");
    assert_eq!(ps.workloads[0].uid, rustix::process::getuid().as_raw());
    match client.status().await {
        Err(ClientError::Api(e)) => assert_eq!(e.kind, "internal"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client.ps().await.unwrap().workloads.len(),
        1,
        "still serving"
    );

    let clamped = client.inspect(5, Duration::from_millis(1)).await.unwrap();
    assert_eq!(clamped.report_json, "5 100");
    match client.inspect(0, Duration::from_secs(1)).await {
        Err(ClientError::Api(e)) => assert_eq!(e.kind, "no_such_process"),
        other => panic!("{other:?}"),
    }

    let mut updates = Vec::new();
    let target = WatchTarget::Pid {
        pid: 7,
        start_time: None,
    };
    let end = client.watch(&target, |u| updates.push(u.clone())).await;
    assert_eq!(end.unwrap(), WatchEnd::TargetEnded);
    assert_eq!(updates.len(), 2);
    assert_eq!(updates[0].target, "pid 7");
    assert!(!updates[0].ended && updates[1].ended);
    assert_eq!(updates[1].end_reason, "exited");
    match client.watch(&WatchTarget::Host, |_| {}).await {
        Err(ClientError::Api(e)) => assert_eq!(e.kind, "no_such_process"),
        other => panic!("{other:?}"),
    }

    stop.send(true).unwrap();
    server.await.unwrap().unwrap();
    assert!(!path.exists(), "the socket is removed on shutdown");
    assert!(Client::connect(&path).await.unwrap().is_none());
}

#[tokio::test]
async fn a_request_without_a_command_or_unreadable_is_a_bad_request() {
    let dir = TempDir::new("bad");
    let path = dir.0.join("infermem.sock");
    let (stop, server) = start(&path);
    let mut stream = UnixStream::connect(&path).await.unwrap();
    wire::write_message(&mut stream, &proto::Request { kind: None }, None)
        .await
        .unwrap();
    let response: proto::Response = wire::read_message(&mut stream, None)
        .await
        .unwrap()
        .unwrap();
    match response.kind {
        Some(response::Kind::Error(e)) => assert_eq!(e.kind, "bad_request"),
        other => panic!("{other:?}"),
    }
    let mut stream = UnixStream::connect(&path).await.unwrap();
    stream.write_all(&[3, 0xff, 0xff, 0xff]).await.unwrap();
    let response: proto::Response = wire::read_message(&mut stream, None)
        .await
        .unwrap()
        .unwrap();
    match response.kind {
        Some(response::Kind::Error(e)) => assert_eq!(e.kind, "bad_request", "{e:?}"),
        other => panic!("{other:?}"),
    }
    drop(stop);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn connections_over_the_limit_are_told_the_agent_is_unavailable() {
    let dir = TempDir::new("busy");
    let path = dir.0.join("infermem.sock");
    let (stop, server) = start(&path);
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(UnixStream::connect(&path).await.unwrap());
    }
    // Connections are accepted in order: the held ones take every slot first.
    let mut client = Client::connect(&path).await.unwrap().unwrap();
    match client.ps().await {
        Err(ClientError::Api(e)) => assert_eq!(e.kind, "unavailable"),
        other => panic!("{other:?}"),
    }
    held.pop();
    let freed = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match client.ps().await {
            Ok(ps) => break assert_eq!(ps.workloads.len(), 1),
            Err(ClientError::Api(e))
                if e.kind == "unavailable" && tokio::time::Instant::now() < freed =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    stop.send(true).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_stale_socket_is_replaced_but_not_a_live_one_nor_another_file() {
    let dir = TempDir::new("stale");
    fs::create_dir_all(&dir.0).unwrap();
    let path = dir.0.join("infermem.sock");
    drop(StdUnixListener::bind(&path).unwrap());
    assert!(Client::connect(&path).await.unwrap().is_none());
    let gid = rustix::process::getgid().as_raw();
    let listener = bind(&path, Some(gid), 0o600).unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o600, gid));

    let live = bind(&path, None, DEFAULT_SOCKET_MODE).unwrap_err();
    assert_eq!(live.kind(), io::ErrorKind::AddrInUse);
    assert!(
        live.to_string()
            .contains("another infermem run is listening")
    );
    drop(listener);
    assert!(!path.exists());

    fs::write(&path, "not a socket").unwrap();
    let refused = bind(&path, None, DEFAULT_SOCKET_MODE).unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(fs::read_to_string(&path).unwrap(), "not a socket");
}

#[test]
fn root_and_admin_group_members_see_all() {
    let user = |gid, groups: &[u32]| Credentials {
        uid: 1000,
        gid,
        groups: groups.to_vec(),
    };
    let root = Credentials {
        uid: 0,
        gid: 0,
        groups: vec![],
    };
    assert!(sees_all(&root, None));
    assert!(!sees_all(&user(1000, &[4, 27]), None));
    assert!(!sees_all(&user(1000, &[4, 27]), Some(990)));
    assert!(sees_all(&user(1000, &[4, 990]), Some(990)));
    assert!(sees_all(&user(990, &[]), Some(990)));
}

#[test]
fn supplementary_groups_come_from_a_status_of_the_same_user() {
    let status = "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\n\
                  Gid:\t1000\t1000\t1000\t1000\nGroups:\t4 27 990 \n";
    assert_eq!(supplementary_groups(status, 1000), Some(vec![4, 27, 990]));
    assert_eq!(supplementary_groups(status, 1001), None);
    let none = "Uid:\t1000\t1000\t1000\t1000\nGroups:\t\n";
    assert_eq!(supplementary_groups(none, 1000), Some(vec![]));
    assert_eq!(supplementary_groups("Uid:\t1000\t1000\n", 1000), None);
}

#[test]
fn inspect_windows_are_clamped() {
    assert_eq!(inspect_duration(0), INSPECT_MIN);
    assert_eq!(inspect_duration(2000), Duration::from_secs(2));
    assert_eq!(inspect_duration(u32::MAX), INSPECT_MAX);
}
