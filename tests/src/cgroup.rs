//! Child memory cgroups with a hard limit, for real OOM kills that harm nothing else.

use std::{
    fs,
    path::PathBuf,
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
            CgroupVersion::V2 => {
                let control = mount.join("cgroup.subtree_control");
                let enabled = fs::read_to_string(&control).unwrap_or_default();
                if !enabled.split_whitespace().any(|c| c == "memory") {
                    fs::write(&control, "+memory").expect("enable the memory controller");
                }
                "/".to_owned()
            }
        };
        let path = format!(
            "{}/{name}-{}",
            parent.trim_end_matches('/'),
            std::process::id()
        );
        let dir = mount.join(path.trim_start_matches('/'));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let (file, value) = match version {
            CgroupVersion::V1 => ("memory.limit_in_bytes", limit_bytes.to_string()),
            CgroupVersion::V2 => ("memory.max", limit_bytes.to_string()),
        };
        fs::write(dir.join(file), value).expect("set the memory limit");
        if version == CgroupVersion::V2 {
            // No swap either, so the limit is reached rather than swapped around.
            let _ = fs::write(dir.join("memory.swap.max"), "0");
        }
        TestCgroup { version, dir, path }
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

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The cgroup can be removed once its (killed) processes are reaped.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
