//! The memory cgroup of a process, with its limit and usage, on cgroup v1 or v2.
//!
//! v1 (`memory.limit_in_bytes`, `memory.usage_in_bytes`, `hierarchical_memory_limit` in
//! `memory.stat`) and v2 (`memory.max`, `memory.high`, `memory.current`) are read following
//! Documentation/admin-guide/cgroup-v1/memory.rst and cgroup-v2.rst. Hybrid hosts (v1 memory
//! controller beside a v2 mount without it, like this project's CI machines) use v1.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{CollectError, open};

/// The cgroup interface version a memory cgroup belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    V1,
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// Where the memory controller is mounted on this host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupLayout {
    /// Mount point of a v1 hierarchy with the memory controller.
    pub v1_memory: Option<PathBuf>,
    /// Mount point of the v2 hierarchy.
    pub v2: Option<PathBuf>,
    /// Controllers available at the v2 root (`cgroup.controllers`).
    pub v2_controllers: Vec<String>,
}

impl CgroupLayout {
    /// Reads the mounts of this host (through our own mountinfo).
    pub fn detect() -> Self {
        let mut layout = CgroupLayout::default();
        let Ok(mounts) = procfs::process::Process::myself().and_then(|me| me.mountinfo()) else {
            return layout;
        };
        for mount in mounts {
            match mount.fs_type.as_str() {
                "cgroup" if mount.super_options.contains_key("memory") => {
                    layout.v1_memory.get_or_insert(mount.mount_point);
                }
                "cgroup2" if layout.v2.is_none() => {
                    layout.v2_controllers =
                        fs::read_to_string(mount.mount_point.join("cgroup.controllers"))
                            .map(|s| s.split_whitespace().map(str::to_owned).collect())
                            .unwrap_or_default();
                    layout.v2 = Some(mount.mount_point);
                }
                _ => {}
            }
        }
        layout
    }

    /// The hierarchy that carries the memory controller, and its mount point.
    pub fn memory_hierarchy(&self) -> Option<(CgroupVersion, &Path)> {
        if let Some(v1) = &self.v1_memory {
            return Some((CgroupVersion::V1, v1));
        }
        let v2 = self.v2.as_deref()?;
        self.v2_controllers
            .iter()
            .any(|c| c == "memory")
            .then_some((CgroupVersion::V2, v2))
    }
}

/// A memory cgroup and what it allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryCgroup {
    pub version: CgroupVersion,
    /// Path inside the hierarchy, as in `/proc/<pid>/cgroup` (e.g. `/system.slice/x.service`).
    pub path: String,
    /// The cgroup's own hard limit (`memory.max` / `memory.limit_in_bytes`); None = unlimited.
    pub limit_bytes: Option<u64>,
    /// The cgroup's current charge (`memory.current` / `memory.usage_in_bytes`).
    pub usage_bytes: Option<u64>,
    /// The tightest hard limit of this cgroup and its ancestors: what the OOM killer enforces.
    pub effective_limit_bytes: Option<u64>,
    /// v2 `memory.high` (throttling threshold); None = unlimited or v1.
    pub high_bytes: Option<u64>,
}

/// Reads the memory cgroup of `pid`; `Ok(None)` if the host has no memory controller.
pub fn memory_cgroup(
    pid: u32,
    layout: &CgroupLayout,
) -> Result<Option<MemoryCgroup>, CollectError> {
    let Some((version, mount)) = layout.memory_hierarchy() else {
        return Ok(None);
    };
    let Some(path) = memory_cgroup_of(pid, version)? else {
        return Ok(None);
    };
    Ok(Some(read_memory_cgroup(version, mount, &path)))
}

/// The path of `pid`'s memory cgroup; None when unknown (gone, or no memory controller).
pub fn memory_cgroup_path(pid: u32, layout: &CgroupLayout) -> Option<String> {
    let (version, _) = layout.memory_hierarchy()?;
    memory_cgroup_of(pid, version).ok()?
}

fn memory_cgroup_of(pid: u32, version: CgroupVersion) -> Result<Option<String>, CollectError> {
    let groups = open(pid)?
        .cgroups()
        .map_err(|e| CollectError::from_proc(pid, "cgroup", e))?;
    Ok(groups.0.into_iter().find_map(|g| match version {
        CgroupVersion::V1 => g
            .controllers
            .iter()
            .any(|c| c == "memory")
            .then_some(g.pathname),
        CgroupVersion::V2 => (g.hierarchy == 0).then_some(g.pathname),
    }))
}

/// The container id a cgroup path names: the last 64-hex-digit id in it, as docker
/// (`/docker/<id>`, `docker-<id>.scope`), containerd (`cri-containerd-<id>.scope`), CRI-O
/// (`crio-<id>.scope`) and podman (`libpod-<id>.scope`) name their cgroups.
pub fn container_id(path: &str) -> Option<&str> {
    path.rsplit('/').find_map(|component| {
        let name = component.strip_suffix(".scope").unwrap_or(component);
        let id = name.rsplit(['-', ':']).next()?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    })
}

/// Reads the limit files of the cgroup at `path` below the hierarchy mounted at `mount`.
pub fn read_memory_cgroup(version: CgroupVersion, mount: &Path, path: &str) -> MemoryCgroup {
    let dir = mount.join(path.trim_start_matches('/'));
    match version {
        CgroupVersion::V1 => {
            let limit = read_u64(&dir.join("memory.limit_in_bytes")).and_then(v1_limit);
            let effective = fs::read_to_string(dir.join("memory.stat"))
                .ok()
                .and_then(|stat| stat_field(&stat, "hierarchical_memory_limit"))
                .and_then(v1_limit);
            MemoryCgroup {
                version,
                path: path.to_owned(),
                limit_bytes: limit,
                usage_bytes: read_u64(&dir.join("memory.usage_in_bytes")),
                effective_limit_bytes: effective.or(limit),
                high_bytes: None,
            }
        }
        CgroupVersion::V2 => {
            let limit = read_v2_limit(&dir.join("memory.max"));
            // The tightest memory.max from here up to the hierarchy root.
            let mut effective = limit;
            let mut ancestor = dir.parent();
            while let Some(current) = ancestor.filter(|a| a.starts_with(mount) && *a != mount) {
                if let Some(l) = read_v2_limit(&current.join("memory.max")) {
                    effective = Some(effective.map_or(l, |e| e.min(l)));
                }
                ancestor = current.parent();
            }
            MemoryCgroup {
                version,
                path: path.to_owned(),
                limit_bytes: limit,
                usage_bytes: read_u64(&dir.join("memory.current")),
                effective_limit_bytes: effective,
                high_bytes: read_v2_limit(&dir.join("memory.high")),
            }
        }
    }
}

/// Finds the path of the memory cgroup whose kernfs id (= directory inode) is `id`.
pub fn path_by_id(layout: &CgroupLayout, id: u64) -> Option<String> {
    let (_, mount) = layout.memory_hierarchy()?;
    find_inode(mount, mount, id, 0)
}

fn find_inode(root: &Path, dir: &Path, id: u64, depth: u32) -> Option<String> {
    if fs::metadata(dir).ok()?.ino() == id {
        let relative = dir.strip_prefix(root).ok()?;
        return Some(format!("/{}", relative.display()));
    }
    if depth >= 32 {
        return None;
    }
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|entry| find_inode(root, &entry.path(), id, depth + 1))
}

/// v1 reports "no limit" as PAGE_COUNTER_MAX pages (0x7FFFFFFFFFFFF000 with 4 KiB pages);
/// anything at or above 2^62 is that sentinel, whatever the page size.
fn v1_limit(raw: u64) -> Option<u64> {
    (raw < 1 << 62).then_some(raw)
}

/// v2 limits are a byte count or the word `max`.
fn read_v2_limit(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    parse_v2_limit(&text)
}

fn parse_v2_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        value => value.parse().ok(),
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A `key value` line of a cgroup stat file.
fn stat_field(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_unlimited_sentinel_is_none() {
        assert_eq!(v1_limit(9_223_372_036_854_771_712), None);
        assert_eq!(v1_limit(64 << 20), Some(64 << 20));
    }

    #[test]
    fn v2_max_is_none_and_numbers_parse() {
        assert_eq!(parse_v2_limit("max\n"), None);
        assert_eq!(parse_v2_limit("67108864\n"), Some(64 << 20));
        assert_eq!(parse_v2_limit("garbage"), None);
    }

    /// The real memory controller, on our own cgroup: v1 on the host, v2 in the VM that
    /// `cargo xtask test --kernel` boots. Nested cgroups, ancestors' limits and `memory.high`
    /// are checked end to end by `tests/cgroup.rs`, on both.
    #[test]
    fn reads_own_memory_cgroup() {
        let layout = CgroupLayout::detect();
        let cg = memory_cgroup(std::process::id(), &layout)
            .unwrap()
            .expect("this host has a memory controller");
        assert!(cg.usage_bytes.unwrap() > 0);
        let id = fs::metadata(
            layout
                .memory_hierarchy()
                .unwrap()
                .1
                .join(cg.path.trim_start_matches('/')),
        )
        .unwrap()
        .ino();
        assert_eq!(path_by_id(&layout, id).as_deref(), Some(cg.path.as_str()));
    }
}

/// What a memory cgroup's event counters say (cumulative since the cgroup was created).
/// v2 fills the `memory.events` fields; v1 fills `failcnt` and the `memory.oom_control` ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEvents {
    /// v2: times usage went over `memory.low` protection and was reclaimed anyway.
    pub low: Option<u64>,
    /// v2: times usage went over `memory.high` and was throttled.
    pub high: Option<u64>,
    /// v2: times usage was about to go over `memory.max`.
    pub max: Option<u64>,
    /// v2: times the cgroup hit its limit and reclaim failed.
    pub oom: Option<u64>,
    /// v2 and v1 (Linux 4.13+): processes of the cgroup the OOM killer killed.
    pub oom_kill: Option<u64>,
    /// v2 (Linux 5.17+): whole-cgroup kills (`memory.oom.group`).
    pub oom_group_kill: Option<u64>,
    /// v1 `memory.failcnt`: times usage hit the limit.
    pub failcnt: Option<u64>,
    /// v1: the OOM killer is disabled for this cgroup (tasks hang instead of dying).
    pub oom_kill_disable: Option<bool>,
    /// v1: the cgroup is out of memory right now.
    pub under_oom: Option<bool>,
}

/// Parses a v2 `memory.events` file.
pub fn parse_v2_events(text: &str) -> MemoryEvents {
    let field = |key| super::keyed_u64(text, key);
    MemoryEvents {
        low: field("low"),
        high: field("high"),
        max: field("max"),
        oom: field("oom"),
        oom_kill: field("oom_kill"),
        oom_group_kill: field("oom_group_kill"),
        ..MemoryEvents::default()
    }
}

/// Parses a v1 `memory.oom_control` file and the text of `memory.failcnt`.
pub fn parse_v1_events(oom_control: &str, failcnt: &str) -> MemoryEvents {
    let field = |key| super::keyed_u64(oom_control, key);
    MemoryEvents {
        oom_kill: field("oom_kill"),
        failcnt: failcnt.trim().parse().ok(),
        oom_kill_disable: field("oom_kill_disable").map(|v| v != 0),
        under_oom: field("under_oom").map(|v| v != 0),
        ..MemoryEvents::default()
    }
}

/// Reads the event counters of the cgroup at `path` below the hierarchy mounted at `mount`.
pub fn read_memory_events(version: CgroupVersion, mount: &Path, path: &str) -> MemoryEvents {
    let dir = mount.join(path.trim_start_matches('/'));
    let read = |name: &str| super::read_small(&dir.join(name)).unwrap_or_default();
    match version {
        CgroupVersion::V1 => parse_v1_events(&read("memory.oom_control"), &read("memory.failcnt")),
        CgroupVersion::V2 => parse_v2_events(&read("memory.events")),
    }
}

/// A v2 cgroup's `memory.pressure`; None on v1 (which has no PSI per cgroup) or without PSI.
pub fn read_memory_pressure(
    version: CgroupVersion,
    mount: &Path,
    path: &str,
) -> Option<super::pressure::Pressure> {
    let dir = mount.join(path.trim_start_matches('/'));
    (version == CgroupVersion::V2)
        .then(|| super::pressure::read_pressure(&dir.join("memory.pressure")))?
}

#[cfg(test)]
mod event_tests {
    use super::*;

    #[test]
    fn v2_memory_events() {
        let e = parse_v2_events("low 0\nhigh 12\nmax 40\noom 2\noom_kill 1\noom_group_kill 0\n");
        assert_eq!((e.low, e.high, e.max), (Some(0), Some(12), Some(40)));
        assert_eq!(
            (e.oom, e.oom_kill, e.oom_group_kill),
            (Some(2), Some(1), Some(0))
        );
        assert_eq!((e.failcnt, e.under_oom), (None, None));
        // Kernels before 5.17 have no oom_group_kill.
        assert_eq!(parse_v2_events("oom 0\noom_kill 0\n").oom_group_kill, None);
    }

    #[test]
    fn v1_oom_control_and_failcnt() {
        let e = parse_v1_events("oom_kill_disable 0\nunder_oom 1\noom_kill 3\n", "57\n");
        assert_eq!(e.failcnt, Some(57));
        assert_eq!(
            (e.oom_kill_disable, e.under_oom, e.oom_kill),
            (Some(false), Some(true), Some(3))
        );
        assert_eq!(e.max, None);
        assert_eq!(parse_v1_events("", ""), MemoryEvents::default());
    }

    /// Our own cgroup on the real controller (v1 here, v2 in the kernel-matrix VM).
    #[test]
    fn reads_own_cgroup_events() {
        let layout = CgroupLayout::detect();
        let (version, mount) = layout.memory_hierarchy().expect("a memory controller");
        let cg = memory_cgroup(std::process::id(), &layout).unwrap().unwrap();
        let events = read_memory_events(version, mount, &cg.path);
        assert!(events.oom_kill.is_some() || events.failcnt.is_some());
        let pressure = read_memory_pressure(version, mount, &cg.path);
        assert_eq!(
            pressure.is_some(),
            version == CgroupVersion::V2
                && mount
                    .join(cg.path.trim_start_matches('/'))
                    .join("memory.pressure")
                    .exists()
        );
    }

    #[test]
    fn container_ids_come_from_the_runtimes_cgroup_names() {
        let id = "4f1c3b6a8e2d4c0b9a7f5e3d1c2b4a6f8e0d2c4b6a8f0e2d4c6b8a0f2e4d6c8b";
        let paths = [
            format!("/docker/{id}"),
            format!("/system.slice/docker-{id}.scope"),
            format!("/kubepods.slice/kubepods-burstable.slice/cri-containerd-{id}.scope"),
            format!("/kubepods/burstable/pod1/crio-{id}.scope"),
            format!("/machine.slice/libpod-{id}.scope/container"),
        ];
        for path in &paths {
            assert_eq!(container_id(path), Some(id), "{path}");
        }
        assert_eq!(
            container_id("/user.slice/user-1000.slice/session-2.scope"),
            None
        );
        assert_eq!(container_id("/"), None);
        assert_eq!(container_id(&format!("/docker/{}", &id[1..])), None);
    }
}
