//! Which fds are NVIDIA fds: the rule the kernel probes apply to opened paths, and the scan of
//! `/proc/*/fd` that finds the fds opened before the agent started.
//!
//! The scan only reads links (`readlink` never blocks on a file's filesystem) and, with
//! [`FdCheck::Device`], `stat`s a link that names an NVIDIA device node, to confirm it is a
//! character device of the NVIDIA major. [`FdCheck::Path`] accepts the path alone: the tests'
//! stand-in for the driver is a FUSE file mounted at the device paths in a private mount
//! namespace, which is not a character device.

use std::{os::unix::fs::FileTypeExt as _, path::Path};

use infermem_common::nvidia_fd;

/// The character-device major of `/dev/nvidiactl` and `/dev/nvidiaN` (NV_MAJOR_DEVICE_NUMBER).
pub const NVIDIA_MAJOR: u32 = 195;

/// At most this many fds are read per process, and this many NVIDIA fds kept in all.
const MAX_FDS_PER_PROCESS: usize = 1 << 16;
const MAX_NVIDIA_FDS: usize = 1 << 14;

/// How a scanned fd is recognised as an NVIDIA fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FdCheck {
    /// Its path is an NVIDIA device node's and it is a character device of major 195.
    #[default]
    Device,
    /// Its path alone (for a stand-in driver, as the tests use; a process could then inflate
    /// only its own figures).
    Path,
}

/// The [`nvidia_fd`] kind of a device path, as the kernel probes classify opened paths:
/// exactly `/dev/nvidiactl`, `/dev/nvidia-uvm` or `/dev/nvidia<N>` (N decimal, at most
/// [`nvidia_fd::MAX_DEVICE_MINOR`]).
pub fn kind_of_path(path: &str) -> Option<u32> {
    let rest = path.strip_prefix("/dev/nvidia")?;
    match rest {
        "ctl" => Some(nvidia_fd::CTL),
        "-uvm" => Some(nvidia_fd::UVM),
        digits if (1..=3).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) => {
            let minor: u32 = digits.parse().ok()?;
            (minor <= nvidia_fd::MAX_DEVICE_MINOR).then_some(nvidia_fd::DEVICE + minor)
        }
        _ => None,
    }
}

/// One NVIDIA fd found by [`scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundFd {
    pub tgid: u32,
    pub fd: u32,
    /// Its [`nvidia_fd`] kind.
    pub kind: u32,
}

/// The NVIDIA fds of every process in `/proc` (`proc_root`), bounded. Processes that vanish
/// or whose fds cannot be read are skipped.
pub fn scan(proc_root: &Path, check: FdCheck) -> Vec<FoundFd> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return found;
    };
    for tgid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
    {
        scan_process(proc_root, tgid, check, &mut found);
        if found.len() >= MAX_NVIDIA_FDS {
            found.truncate(MAX_NVIDIA_FDS);
            break;
        }
    }
    found
}

/// Appends the NVIDIA fds of one process.
pub fn scan_process(proc_root: &Path, tgid: u32, check: FdCheck, found: &mut Vec<FoundFd>) {
    let dir = proc_root.join(tgid.to_string()).join("fd");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten().take(MAX_FDS_PER_PROCESS) {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let Some(kind) = target.to_str().and_then(kind_of_path) else {
            continue;
        };
        if check == FdCheck::Path || is_nvidia_device(&entry.path()) {
            found.push(FoundFd { tgid, fd, kind });
        }
    }
}

/// Whether the file behind `link` (a `/proc/<pid>/fd/<n>` entry) is an NVIDIA character
/// device.
fn is_nvidia_device(link: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(link).is_ok_and(|m| {
        m.file_type().is_char_device() && rustix::fs::major(m.rdev()) == NVIDIA_MAJOR
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_paths_are_classified_as_the_probes_classify_them() {
        assert_eq!(kind_of_path("/dev/nvidiactl"), Some(nvidia_fd::CTL));
        assert_eq!(kind_of_path("/dev/nvidia-uvm"), Some(nvidia_fd::UVM));
        assert_eq!(kind_of_path("/dev/nvidia0"), Some(nvidia_fd::DEVICE));
        assert_eq!(kind_of_path("/dev/nvidia17"), Some(nvidia_fd::DEVICE + 17));
        for other in [
            "/dev/nvidia",
            "/dev/nvidia-uvm-tools",
            "/dev/nvidia-modeset",
            "/dev/nvidia-caps/nvidia-cap1",
            "/dev/nvidia255",
            "/dev/nvidia1234",
            "/dev/nvidia0 (deleted)",
            "/tmp/dev/nvidiactl",
        ] {
            assert_eq!(kind_of_path(other), None, "{other}");
        }
    }

    #[test]
    fn the_scan_finds_a_file_at_a_device_path_only_when_checking_paths() {
        // This process has no NVIDIA fd; /dev/null stands for a file whose link is read.
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut found = Vec::new();
        scan_process(
            Path::new("/proc"),
            std::process::id(),
            FdCheck::Path,
            &mut found,
        );
        assert!(found.is_empty(), "{found:?}");
        drop(null);
        // A character device of another major (1) is not an NVIDIA device.
        assert!(!is_nvidia_device(Path::new("/dev/null")));
        assert!(scan(Path::new("/nonexistent"), FdCheck::Device).is_empty());
    }
}
