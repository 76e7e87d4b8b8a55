//! Who sees what through the agent's socket: a user of the socket's group who is not in the
//! admin group sees only their own processes. Needs the host's user tools (groupadd,
//! setpriv, /etc/group), so it is in `HOST_ONLY_TESTS` of the kernel-matrix VM.

use std::{os::unix::process::CommandExt as _, path::Path, process::Command};

use infermem_tests::{
    Talker,
    daemon::{Daemon, NOTICE_TIMEOUT, STANDALONE_NOTE, serial, workload_of, write_gguf},
    output_of, require_root, workload_bin,
};
use serde_json::Value;

const NOBODY: u32 = 65534;

/// A group created for the test (removed when dropped), or `nogroup` where groupadd is
/// missing.
struct TestGroup {
    name: String,
    gid: u32,
    created: bool,
}

impl TestGroup {
    fn create() -> TestGroup {
        let name = format!("infermem-t{}", std::process::id());
        let has_groupadd = ["/usr/sbin/groupadd", "/sbin/groupadd"]
            .iter()
            .any(|p| Path::new(p).exists());
        let (name, created) = if has_groupadd {
            let out = output_of(Command::new("groupadd").arg(&name));
            assert!(out.status.success(), "groupadd {name}: {out:?}");
            (name, true)
        } else {
            eprintln!("no groupadd here: using the existing group nogroup");
            ("nogroup".to_owned(), false)
        };
        let gid = gid_of(&name).unwrap_or_else(|| panic!("group {name} is not in /etc/group"));
        TestGroup { name, gid, created }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        if self.created {
            let _ = Command::new("groupdel").arg(&self.name).status();
        }
    }
}

/// The gid of group `name`, from /etc/group.
fn gid_of(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next()? == name).then(|| fields.nth(1)?.parse().ok())?
        })
}

/// `infermem --socket S <args>` as nobody, with `gid` as its only group.
fn as_nobody(agent: &Daemon, gid: u32, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={gid}"),
        "--clear-groups",
        "--inh-caps=-all",
    ])
    .arg(infermem_tests::infermem_bin())
    .arg("--socket")
    .arg(&agent.socket)
    .args(args);
    output_of(&mut cmd)
}

#[test]
fn a_non_root_user_sees_only_their_own_processes() {
    require_root();
    let _serial = serial();
    let group = TestGroup::create();
    let agent = Daemon::start_with(
        "daemon-users",
        &format!(
            "socket_group = \"{}\"\nsocket_mode = \"0660\"\n",
            group.name
        ),
    );
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let socket = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(socket.gid(), group.gid, "the socket's group");
    assert_eq!(
        socket.permissions().mode() & 0o777,
        0o660,
        "the socket's mode"
    );

    let model = agent.dir.join("model.gguf");
    write_gguf(&model);
    let model = model.to_str().unwrap();
    let mut roots = Talker::spawn({
        let mut cmd = Command::new(workload_bin());
        cmd.args(["map-file", model]);
        cmd
    });
    roots.expect_event("mapped");
    let root_pid = roots.pid();
    let mut nobodys = Talker::spawn({
        let mut cmd = Command::new(workload_bin());
        cmd.args(["map-file", model]).uid(NOBODY).gid(NOBODY);
        cmd
    });
    nobodys.expect_event("mapped");
    let nobody_pid = nobodys.pid();

    // Root sees both.
    agent.ps_until(NOTICE_TIMEOUT, |ps| {
        let both = workload_of(ps, root_pid).is_some() && workload_of(ps, nobody_pid).is_some();
        both.then_some(())
    });
    let ps = agent.ps();
    assert_eq!(workload_of(&ps, root_pid).unwrap()["uid"], 0);
    assert_eq!(workload_of(&ps, nobody_pid).unwrap()["uid"], NOBODY);

    // Nobody, a member of the socket's group, sees only its own.
    let out = as_nobody(&agent, group.gid, &["ps", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ps as nobody: {out:?}");
    assert!(!stderr.contains(STANDALONE_NOTE), "ps as nobody: {stderr}");
    let ps: Value = serde_json::from_slice(&out.stdout).expect("ps JSON");
    assert_eq!(ps["daemon"]["mode"], "daemon", "{ps}");
    assert!(workload_of(&ps, nobody_pid).is_some(), "{ps}");
    assert!(
        workload_of(&ps, root_pid).is_none(),
        "nobody sees root's process: {ps}"
    );
    for w in ps["workloads"].as_array().unwrap() {
        assert_eq!(w["uid"], NOBODY, "nobody sees another user's process: {w}");
    }

    // Nobody may inspect its own process through the agent…
    let out = as_nobody(
        &agent,
        group.gid,
        &[
            "inspect",
            &nobody_pid.to_string(),
            "--json",
            "--duration",
            "1s",
        ],
    );
    assert!(
        out.status.success(),
        "nobody inspecting its own process: {out:?}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    assert_eq!(report["pid"], nobody_pid, "{report}");

    // …but not root's: refused with the JSON error of the contract.
    let out = as_nobody(
        &agent,
        group.gid,
        &[
            "inspect",
            &root_pid.to_string(),
            "--json",
            "--duration",
            "1s",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "nobody inspected root's process: {out:?}"
    );
    assert!(!stderr.contains(STANDALONE_NOTE), "{stderr}");
    let error: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "inspect --json printed no JSON error ({e}): stdout {:?}, stderr {stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(error["error"]["kind"], "permission_denied", "{error}");

    assert!(roots.finish().success());
    assert!(nobodys.finish().success());
}
