//! The kernel's knobs infermem turns: memory cgroup files and `oom_score_adj`. Each write
//! returns the value before and the value the kernel then reports (it rounds), so that a
//! revert can put back exactly what was there, and only if nobody changed it since.

use std::{
    fs::OpenOptions,
    io::{Read, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Component, Path, PathBuf},
};

use crate::collect::cgroup::CgroupVersion;

/// A knob's value before and after a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub before: String,
    pub after: String,
    /// The cgroup directory's inode: a cgroup removed and made again is another one.
    pub cgroup_ino: Option<u64>,
}

/// How a revert went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reverted {
    /// The value before is back.
    Restored,
    /// Someone else changed it since: left as they set it.
    ChangedSince(String),
    /// The cgroup or the process is gone (or is another one now).
    Gone,
}

/// Errors of the knobs: the file and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum KnobError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

/// `value` as a cgroup file wants it: [`u64::MAX`] is `max` on v2 and `-1` on v1.
pub fn render_for(version: CgroupVersion, value: u64) -> String {
    match (value, version) {
        (u64::MAX, CgroupVersion::V2) => "max".to_owned(),
        (u64::MAX, CgroupVersion::V1) => "-1".to_owned(),
        (bytes, _) => bytes.to_string(),
    }
}

/// `value` for people: `max`, or a size.
pub fn render_bytes(value: u64) -> String {
    match value {
        u64::MAX => "max".to_owned(),
        bytes => crate::units::format_bytes(bytes),
    }
}

/// The directory of the memory cgroup at `path` under `mount`; refuses the root cgroup
/// and paths that would leave the hierarchy.
pub fn cgroup_dir(mount: &Path, path: &str) -> Result<PathBuf, KnobError> {
    let relative = Path::new(path.trim_start_matches('/'));
    let normal = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if relative.as_os_str().is_empty() || !normal {
        return Err(KnobError::Refused(format!(
            "{path:?} is the root cgroup or not a plain cgroup path"
        )));
    }
    Ok(mount.join(relative))
}

/// Writes `value` to `file` of the cgroup directory `dir`, with the value before and after.
pub fn write_cgroup(dir: &Path, file: &str, value: &str) -> Result<Change, KnobError> {
    let cgroup_ino = Some(inode(dir)?);
    let path = knob_path(dir, file)?;
    let before = read_knob(&path)?;
    write_knob(&path, value)?;
    let after = read_knob(&path)?;
    Ok(Change {
        before,
        after,
        cgroup_ino,
    })
}

/// Puts `change.before` back into `file`, if the cgroup is the same one and the file still
/// holds what infermem wrote.
pub fn revert_cgroup(dir: &Path, file: &str, change: &Change) -> Result<Reverted, KnobError> {
    match inode(dir) {
        Ok(ino) if Some(ino) == change.cgroup_ino => {}
        _ => return Ok(Reverted::Gone),
    }
    let path = knob_path(dir, file)?;
    restore(&path, change)
}

/// Reads a process's `oom_score_adj`.
pub fn read_oom_score_adj(pid: u32) -> Result<i32, KnobError> {
    let path = PathBuf::from(format!("/proc/{pid}/oom_score_adj"));
    let text = read_knob(&path)?;
    text.parse()
        .map_err(|_| KnobError::Refused(format!("{}: not a number: {text:?}", path.display())))
}

/// Sets a process's `oom_score_adj` (the caller has checked its identity).
pub fn write_oom_score_adj(pid: u32, value: i32) -> Result<Change, KnobError> {
    let path = PathBuf::from(format!("/proc/{pid}/oom_score_adj"));
    let before = read_knob(&path)?;
    write_knob(&path, &value.to_string())?;
    let after = read_knob(&path)?;
    Ok(Change {
        before,
        after,
        cgroup_ino: None,
    })
}

/// Puts a process's `oom_score_adj` back (the caller has checked its identity).
pub fn revert_oom_score_adj(pid: u32, change: &Change) -> Result<Reverted, KnobError> {
    let path = PathBuf::from(format!("/proc/{pid}/oom_score_adj"));
    if !path.exists() {
        return Ok(Reverted::Gone);
    }
    restore(&path, change)
}

fn restore(path: &Path, change: &Change) -> Result<Reverted, KnobError> {
    let now = match read_knob(path) {
        Ok(now) => now,
        Err(KnobError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Reverted::Gone);
        }
        Err(err) => return Err(err),
    };
    if now != change.after {
        return Ok(Reverted::ChangedSince(now));
    }
    write_knob(path, &change.before)?;
    Ok(Reverted::Restored)
}

/// `dir/file`, where `file` must be a plain `memory.*` file name.
fn knob_path(dir: &Path, file: &str) -> Result<PathBuf, KnobError> {
    let plain = file.starts_with("memory.") && !file.contains('/');
    if !plain {
        return Err(KnobError::Refused(format!(
            "{file:?} is not a memory cgroup file"
        )));
    }
    Ok(dir.join(file))
}

fn inode(path: &Path) -> Result<u64, KnobError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| io_error(path, source))
}

/// Reads a knob (a short kernel file), trimmed; the first line only, at most 4 KiB.
fn read_knob(path: &Path) -> Result<String, KnobError> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| io_error(path, source))?;
    let mut text = String::new();
    (&mut file)
        .take(4096)
        .read_to_string(&mut text)
        .map_err(|source| io_error(path, source))?;
    Ok(text.lines().next().unwrap_or("").trim().to_owned())
}

fn write_knob(path: &Path, value: &str) -> Result<(), KnobError> {
    // O_TRUNC as a shell's `>` does: kernfs ignores it, a plain file (tests) needs it.
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| io_error(path, source))?;
    file.write_all(value.as_bytes())
        .map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: std::io::Error) -> KnobError {
    KnobError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_stay_inside_the_hierarchy_and_never_name_the_root() {
        let mount = Path::new("/sys/fs/cgroup");
        assert_eq!(
            cgroup_dir(mount, "/system.slice/a.service").unwrap(),
            Path::new("/sys/fs/cgroup/system.slice/a.service")
        );
        for bad in ["/", "", "/a/../..", "/.."] {
            assert!(cgroup_dir(mount, bad).is_err(), "{bad:?}");
        }
        assert!(knob_path(mount, "memory.low").is_ok());
        assert!(knob_path(mount, "cgroup.procs").is_err());
        assert!(knob_path(mount, "memory.low/../x").is_err());
    }

    #[test]
    fn unlimited_is_written_as_each_version_wants() {
        assert_eq!(render_for(CgroupVersion::V2, u64::MAX), "max");
        assert_eq!(render_for(CgroupVersion::V1, u64::MAX), "-1");
        assert_eq!(render_for(CgroupVersion::V1, 4096), "4096");
    }

    #[test]
    fn a_revert_restores_only_what_it_wrote() {
        let dir = std::env::temp_dir().join(format!("infermem-knobs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.low"), "0\n").unwrap();
        let change = write_cgroup(&dir, "memory.low", "4096").unwrap();
        assert_eq!(
            (change.before.as_str(), change.after.as_str()),
            ("0", "4096")
        );
        assert_eq!(
            revert_cgroup(&dir, "memory.low", &change).unwrap(),
            Reverted::Restored
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.low")).unwrap(),
            "0"
        );
        // Someone else's value since the write is left alone.
        let change = write_cgroup(&dir, "memory.low", "8192").unwrap();
        std::fs::write(dir.join("memory.low"), "1234").unwrap();
        assert_eq!(
            revert_cgroup(&dir, "memory.low", &change).unwrap(),
            Reverted::ChangedSince("1234".into())
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            revert_cgroup(&dir, "memory.low", &change).unwrap(),
            Reverted::Gone
        );
    }
}
