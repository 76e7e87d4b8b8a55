//! Child memory cgroups for the benchmarks' workloads, on cgroup v1 or v2, as the end-to-end
//! tests make them (`tests/src/cgroup.rs`; xtask cannot use the tests crate, which depends on
//! the agent, whose build script depends on xtask): a hard limit, and swap kept from relieving
//! it.

use std::{
    fs,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The memory controller's version.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// A memory cgroup made for one scenario; dropping it kills what is left in it and removes it.
pub struct Cgroup {
    pub version: Version,
    /// Directory in the cgroup filesystem.
    pub dir: PathBuf,
    /// Path inside the hierarchy, as `/proc/<pid>/cgroup` (and the agent) show it.
    pub path: String,
}

impl Cgroup {
    /// Creates `bench-<name>-<pid>` with a hard limit of `limit_bytes`: below our own memory
    /// cgroup on v1, below the root on v2 (v2 forbids controllers below a cgroup with
    /// processes).
    pub fn create(name: &str, limit_bytes: u64) -> Result<Cgroup> {
        let (version, mount, parent) = memory_hierarchy()?;
        let path = format!(
            "{}/bench-{name}-{}",
            parent.trim_end_matches('/'),
            std::process::id()
        );
        let dir = mount.join(path.trim_start_matches('/'));
        if version == Version::V2 {
            enable_memory_controller(dir.parent().context("a parent cgroup")?)?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let cgroup = Cgroup { version, dir, path };
        cgroup.limit(limit_bytes)?;
        Ok(cgroup)
    }

    /// Sets the hard limit and keeps swap out of it (v1: memsw at the same value, or
    /// swappiness 0 without swap accounting; v2: `memory.swap.max` 0).
    fn limit(&self, bytes: u64) -> Result<()> {
        match self.version {
            Version::V1 => {
                self.write("memory.limit_in_bytes", &bytes.to_string())?;
                if self.dir.join("memory.memsw.limit_in_bytes").exists() {
                    self.write("memory.memsw.limit_in_bytes", &bytes.to_string())
                } else {
                    self.write("memory.swappiness", "0")
                }
            }
            Version::V2 => {
                self.write("memory.max", &bytes.to_string())?;
                if self.dir.join("memory.swap.max").exists() {
                    self.write("memory.swap.max", "0")?;
                }
                Ok(())
            }
        }
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        fs::write(self.dir.join(file), value)
            .with_context(|| format!("writing {value} to {}/{file}", self.dir.display()))
    }

    /// `program args…` started inside this cgroup: a shell moves itself in, then forks it
    /// (the program is the shell's child: take its pid from what it prints). Not an exec of
    /// the shell: the agent reads a process's memory cgroup when it sees the fork, and does
    /// not read it again at the exec, so a process that moves itself between its fork and its
    /// exec stays attributed to its parent's cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        // The trailing `exit` keeps the shell from exec'ing the last command itself.
        let script = "echo $$ > \"$1/cgroup.procs\" && shift && \"$@\"; exit $?";
        cmd.args(["-c", script, "sh"])
            .arg(&self.dir)
            .arg(program)
            .args(args);
        cmd
    }

    /// The OOM kills the kernel counted in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    fn pids(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            let pids = self.pids();
            if !pids.is_empty() {
                let _ = Command::new("kill").arg("-KILL").args(&pids).status();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The memory controller's version, its mount point and our own cgroup's path in it (v1) or
/// `/` (v2).
fn memory_hierarchy() -> Result<(Version, PathBuf, String)> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let own = fs::read_to_string("/proc/self/cgroup")?;
    // v1 first: with a v1 memory controller mounted, v2 has no memory controller.
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (root, mount) = (fields[3], fields[4]);
        let fstype = fields.get(dash + 1).copied().unwrap_or("");
        let options = fields.get(dash + 3).copied().unwrap_or("");
        if fstype == "cgroup" && options.split(',').any(|o| o == "memory") {
            let path = own
                .lines()
                .find_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let controllers = parts.nth(1)?;
                    controllers
                        .split(',')
                        .any(|c| c == "memory")
                        .then(|| parts.next().map(str::to_owned))?
                })
                .context("no memory line in /proc/self/cgroup")?;
            // Inside a namespace, the mount's root is a prefix of our path.
            let relative = path
                .strip_prefix(root.trim_end_matches('/'))
                .unwrap_or(&path);
            let parent = format!("/{}", relative.trim_start_matches('/'));
            return Ok((Version::V1, PathBuf::from(mount), parent));
        }
    }
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let mount = PathBuf::from(fields[4]);
        let controllers = fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
        if fields.get(dash + 1) == Some(&"cgroup2")
            && controllers.split_whitespace().any(|c| c == "memory")
        {
            return Ok((Version::V2, mount, "/".to_owned()));
        }
    }
    bail!("this host has no memory cgroup controller")
}

/// Lets the children of the v2 cgroup `dir` use the memory controller.
fn enable_memory_controller(dir: &std::path::Path) -> Result<()> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&control).unwrap_or_default();
    if !enabled.split_whitespace().any(|c| c == "memory") {
        fs::write(&control, "+memory")
            .with_context(|| format!("enabling memory in {}", control.display()))?;
    }
    Ok(())
}
