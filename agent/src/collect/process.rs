//! Who a process is: pid, start time (to detect pid reuse), name, command line, executable.

use std::path::PathBuf;

use super::{CollectError, open};

/// A process's identity. `start_time` (clock ticks after boot) tells a live process from a
/// later one that reuses its pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    pub cmdline: Vec<String>,
    /// `/proc/<pid>/exe`, if readable.
    pub exe: Option<PathBuf>,
}

/// Cumulative counters from `/proc/<pid>/stat` that sampling turns into rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessCounters {
    /// Minor + major page faults of the whole thread group (what `ps` shows).
    pub faults: u64,
    pub major_faults: u64,
}

/// Reads the identity of `pid`.
pub fn identity(pid: u32) -> Result<ProcessIdentity, CollectError> {
    let process = open(pid)?;
    let stat = process
        .stat()
        .map_err(|e| CollectError::from_proc(pid, "stat", e))?;
    let tgid = process
        .status()
        .map_err(|e| CollectError::from_proc(pid, "status", e))?
        .tgid;
    if u32::try_from(tgid).ok() != Some(pid) {
        // /proc/<tid> of a thread resolves, but a thread is not a process.
        return Err(CollectError::NoSuchProcess(pid));
    }
    let cmdline = process
        .cmdline()
        .map_err(|e| CollectError::from_proc(pid, "cmdline", e))?;
    Ok(ProcessIdentity {
        pid,
        start_time: stat.starttime,
        comm: stat.comm,
        cmdline,
        exe: process.exe().ok(),
    })
}

/// The environment of `pid` as `KEY=value` pairs; empty when unreadable (another user's
/// process without privileges).
pub fn environ(pid: u32) -> Vec<(String, String)> {
    let Ok(environ) = open(pid).and_then(|p| {
        p.environ()
            .map_err(|e| CollectError::from_proc(pid, "environ", e))
    }) else {
        return Vec::new();
    };
    let mut pairs: Vec<(String, String)> = environ
        .into_iter()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    pairs.sort();
    pairs
}

/// Reads the fault counters of `pid`, checking that it is still the process `expected`.
pub fn counters(expected: &ProcessIdentity) -> Result<ProcessCounters, CollectError> {
    let pid = expected.pid;
    let stat = open(pid)?
        .stat()
        .map_err(|e| CollectError::from_proc(pid, "stat", e))?;
    if stat.starttime != expected.start_time {
        return Err(CollectError::Reused(pid));
    }
    Ok(ProcessCounters {
        faults: stat.minflt + stat.majflt,
        major_faults: stat.majflt,
    })
}

/// Checks that `expected` is still alive and still the same process.
pub fn still_alive(expected: &ProcessIdentity) -> Result<(), CollectError> {
    counters(expected).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_identity_and_detects_reuse() {
        let me = std::process::id();
        let id = identity(me).unwrap();
        assert_eq!(id.pid, me);
        assert!(!id.cmdline.is_empty());
        assert!(counters(&id).unwrap().faults > 0);
        let impostor = ProcessIdentity {
            start_time: id.start_time + 1,
            ..id
        };
        assert!(matches!(counters(&impostor), Err(CollectError::Reused(_))));
    }

    #[test]
    fn missing_pid_is_a_clear_error() {
        // pid_max is at most 2^22, so this pid cannot exist.
        let err = identity(4_194_304 + 17).unwrap_err();
        assert!(matches!(err, CollectError::NoSuchProcess(_)), "{err}");
        assert!(err.to_string().contains("no such process"));
    }

    #[test]
    fn a_thread_id_is_not_a_process() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = tid_rx.recv().unwrap();
        // /proc/<tid> resolves for a live thread, but it is not a process.
        assert!(std::path::Path::new(&format!("/proc/{tid}")).exists());
        assert!(matches!(identity(tid), Err(CollectError::NoSuchProcess(_))));
        done_tx.send(()).unwrap();
        handle.join().unwrap();
    }
}
