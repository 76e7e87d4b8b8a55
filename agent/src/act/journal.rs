//! The journal: an append-only file of JSON lines, one per decision and per action, with the
//! values before and after. What was applied and not yet undone is "in force"; an agent that
//! starts after a crash reads the journal and reverts it.
//!
//! Each applied change is written (and synced) right after the kernel took it; a crash in
//! between the two loses that one record. The file is rotated to `<name>.1` when it grows
//! past [`ROTATE_BYTES`], with what is in force carried over.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read, Write},
    os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::Action;
use crate::policy::PolicyMode;

/// The journal is rotated past this size.
pub const ROTATE_BYTES: u64 = 8 << 20;

/// Longest line read back (a record is far shorter).
const MAX_LINE: u64 = 64 << 10;

/// What a record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The policy wants it; the mode (observe, recommend) kept it from being applied.
    Decision,
    /// Applied.
    Apply,
    /// Undone (the policy no longer wants it, the process ended, or `infermem revert`).
    Revert,
    /// Undone at start, left in force by an earlier run of the agent.
    Restore,
    /// Not applied: safety, budget or rate limit.
    Refused,
    /// The kernel or the runtime said no.
    Failed,
    /// Ended without a revert being needed (a pin ends with the agent's process).
    Released,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub event: Event,
    pub mode: PolicyMode,
    /// The action's key ([`Action::key`]).
    pub id: String,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_ino: Option<u64>,
    pub reason: String,
    /// The agent's pid: a record of another run is from a process that is gone.
    pub agent_pid: u32,
}

/// The open journal.
pub struct Journal {
    path: PathBuf,
    file: File,
    seq: u64,
    bytes: u64,
}

impl Journal {
    /// Opens (creating it and its directory, mode 0700/0600) the journal at `path`, and reads
    /// back what is in force.
    pub fn open(path: &Path) -> std::io::Result<(Journal, BTreeMap<String, Record>)> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let (in_force, seq) = read_in_force(path)?;
        let mut file = open_append(path)?;
        let mut bytes = file.metadata()?.len();
        if bytes > 0 && !ends_with_newline(&file, bytes)? {
            // A line torn by a crash: end it, so that the next record stands on its own.
            file.write_all(b"\n")?;
            bytes += 1;
        }
        let journal = Journal {
            path: path.to_owned(),
            file,
            seq,
            bytes,
        };
        Ok((journal, in_force))
    }

    /// Appends a record (its `seq` is set here), synced for applies and reverts.
    pub fn append(&mut self, mut record: Record) -> std::io::Result<()> {
        self.seq += 1;
        record.seq = self.seq;
        let mut line = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.bytes += line.len() as u64;
        if record.event != Event::Decision {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Rotates past [`ROTATE_BYTES`]: the file becomes `<name>.1` and the new one starts with
    /// the records of what is in force.
    pub fn rotate_if_large(&mut self, in_force: &[Record]) -> std::io::Result<()> {
        if self.bytes < ROTATE_BYTES {
            return Ok(());
        }
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = open_append(&self.path)?;
        self.bytes = 0;
        for record in in_force {
            self.append(record.clone())?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn ends_with_newline(file: &File, len: u64) -> std::io::Result<bool> {
    let mut last = [0u8];
    file.read_exact_at(&mut last, len - 1)?;
    Ok(last[0] == b'\n')
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// What the journal at `path` says is in force, by action key, and its last sequence
/// number. A missing journal is empty; a line that does not parse is skipped with a warning.
pub fn read_in_force(path: &Path) -> std::io::Result<(BTreeMap<String, Record>, u64)> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(err) => return Err(err),
    };
    let mut reader = BufReader::new(file);
    let (mut in_force, mut seq) = (BTreeMap::new(), 0);
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        if (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)? == 0 {
            break;
        }
        match serde_json::from_slice::<Record>(&line) {
            Ok(record) => {
                seq = seq.max(record.seq);
                fold(&mut in_force, record);
            }
            Err(err) => {
                tracing::warn!(path = %path.display(), number, "journal line skipped: {err}")
            }
        }
    }
    Ok((in_force, seq))
}

/// Applies one record to the set in force.
fn fold(in_force: &mut BTreeMap<String, Record>, record: Record) {
    match record.event {
        Event::Apply => {
            // A change of value keeps the first value before: that is what a revert restores.
            let first_before = in_force.get(&record.id).and_then(|r| r.before.clone());
            let mut record = record;
            if first_before.is_some() {
                record.before = first_before;
            }
            in_force.insert(record.id.clone(), record);
        }
        Event::Revert | Event::Restore | Event::Released => {
            in_force.remove(&record.id);
        }
        Event::Decision | Event::Refused | Event::Failed => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event: Event, id_value: u64, before: &str, after: &str) -> Record {
        Record {
            seq: 0,
            time: 1.0,
            event,
            mode: PolicyMode::Enforce,
            id: "cgroup:/a:memory.low".into(),
            action: Action::CgroupWrite {
                cgroup: "/a".into(),
                file: "memory.low".into(),
                value: id_value,
            },
            before: Some(before.into()),
            after: Some(after.into()),
            cgroup_ino: Some(7),
            reason: "test".into(),
            agent_pid: 1,
        }
    }

    #[test]
    fn in_force_is_what_was_applied_and_not_undone_with_the_first_value_before() {
        let dir = std::env::temp_dir().join(format!("infermem-journal-{}", std::process::id()));
        let path = dir.join("journal.jsonl");
        let _ = std::fs::remove_dir_all(&dir);
        let (mut journal, in_force) = Journal::open(&path).unwrap();
        assert!(in_force.is_empty());
        journal
            .append(record(Event::Apply, 100, "0", "100"))
            .unwrap();
        journal
            .append(record(Event::Apply, 200, "100", "200"))
            .unwrap();
        journal
            .append(record(Event::Decision, 300, "", ""))
            .unwrap();
        drop(journal);
        // A torn last line (a crash mid-write) is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"seq\":")
            .unwrap();
        let (mut journal, in_force) = Journal::open(&path).unwrap();
        let applied = &in_force["cgroup:/a:memory.low"];
        assert_eq!(applied.before.as_deref(), Some("0"));
        assert_eq!(applied.after.as_deref(), Some("200"));
        journal
            .append(record(Event::Revert, 200, "200", "0"))
            .unwrap();
        let (_, in_force) = Journal::open(&path).unwrap();
        assert!(in_force.is_empty());
        let (_, seq) = read_in_force(&path).unwrap();
        assert_eq!(seq, 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
