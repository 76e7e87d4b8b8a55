//! Child memory cgroups with a hard limit, for real OOM kills that harm nothing else, on cgroup
//! v1 or v2. Swap is limited with memory (or turned off) inside them, so that a test's limit is
//! reached rather than swapped around on hosts that have swap.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use infermem::collect::cgroup::{CgroupLayout, CgroupVersion, memory_cgroup};

/// A memory cgroup created for one test and removed when dropped.
pub struct TestCgroup {
    pub version: CgroupVersion,
    /// Directory in the cgroup filesystem.
    pub dir: PathBuf,
    /// Path inside the hierarchy, as `/proc/<pid>/cgroup` shows it.
    pub path: String,
}

impl TestCgroup {
    /// Creates `name` with a hard memory limit: under our own memory cgroup on v1, under the
    /// root on v2 (v2 forbids enabling controllers below a cgroup that holds processes).
    pub fn create(name: &str, limit_bytes: u64) -> TestCgroup {
        let layout = CgroupLayout::detect();
        let (version, mount) = layout
            .memory_hierarchy()
            .expect("this host has a memory cgroup controller");
        let parent = match version {
            CgroupVersion::V1 => {
                memory_cgroup(std::process::id(), &layout)
                    .expect("read own cgroup")
                    .expect("own memory cgroup")
                    .path
            }
            CgroupVersion::V2 => "/".to_owned(),
        };
        let path = format!(
            "{}/{name}-{}",
            parent.trim_end_matches('/'),
            std::process::id()
        );
        let dir = mount.join(path.trim_start_matches('/'));
        TestCgroup::make(version, dir, path, Some(limit_bytes))
    }

    /// Creates `name` below this cgroup, with a hard limit of its own or none (then only its
    /// ancestors' limits apply).
    pub fn child(&self, name: &str, limit_bytes: Option<u64>) -> TestCgroup {
        TestCgroup::make(
            self.version,
            self.dir.join(name),
            format!("{}/{name}", self.path),
            limit_bytes,
        )
    }

    fn make(
        version: CgroupVersion,
        dir: PathBuf,
        path: String,
        limit_bytes: Option<u64>,
    ) -> TestCgroup {
        if version == CgroupVersion::V2 {
            enable_memory_controller(dir.parent().expect("a parent cgroup"));
        }
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cgroup = TestCgroup { version, dir, path };
        cgroup.limit(limit_bytes);
        cgroup
    }

    /// Sets the hard limit (if any), and keeps swap from relieving it: v1 limits memory+swap
    /// to the same value (`memory.memsw.limit_in_bytes`, set after the memory limit, which it
    /// may not undercut) where swap accounting exists, and sets `memory.swappiness` to 0
    /// otherwise; v2 sets `memory.swap.max` to 0.
    fn limit(&self, bytes: Option<u64>) {
        match self.version {
            CgroupVersion::V1 => {
                if let Some(bytes) = bytes {
                    self.write("memory.limit_in_bytes", &bytes.to_string());
                }
                if !self.dir.join("memory.memsw.limit_in_bytes").exists() {
                    self.write("memory.swappiness", "0");
                } else if let Some(bytes) = bytes {
                    self.write("memory.memsw.limit_in_bytes", &bytes.to_string());
                }
            }
            CgroupVersion::V2 => {
                if let Some(bytes) = bytes {
                    self.write("memory.max", &bytes.to_string());
                }
                // Absent only when the kernel does not account swap per cgroup.
                if self.dir.join("memory.swap.max").exists() {
                    self.write("memory.swap.max", "0");
                }
            }
        }
    }

    /// Writes `value` to the cgroup's control file `file`.
    pub fn write(&self, file: &str, value: &str) {
        fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("writing {value} to {}/{file}: {e}", self.dir.display()));
    }

    /// Reads the number in the cgroup's control file `file`.
    pub fn read_u64(&self, file: &str) -> u64 {
        let text = fs::read_to_string(self.dir.join(file))
            .unwrap_or_else(|e| panic!("reading {}/{file}: {e}", self.dir.display()));
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{}/{file} holds {text:?}: {e}", self.dir.display()))
    }

    /// Moves `pid` into the cgroup.
    pub fn add(&self, pid: u32) {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", self.dir.display()));
    }

    /// OOM kills the kernel counted in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let file = match self.version {
            CgroupVersion::V1 => "memory.oom_control",
            CgroupVersion::V2 => "memory.events",
        };
        fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Lets the children of the v2 cgroup `dir` use the memory controller.
fn enable_memory_controller(dir: &Path) {
    let control = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&control).unwrap_or_default();
    if !enabled.split_whitespace().any(|c| c == "memory") {
        fs::write(&control, "+memory")
            .unwrap_or_else(|e| panic!("enabling memory in {}: {e}", control.display()));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The cgroup can be removed once its (killed) processes are reaped.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
