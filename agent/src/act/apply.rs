//! Carrying out an action on the system, and undoing it: the one place that dispatches an
//! [`Action`] to the cgroup files, `oom_score_adj`, the pinner or a runtime's API.

use std::{fmt, path::PathBuf};

use super::{
    Action, ProcessRef,
    journal::Record,
    knobs::{self, Change, Reverted},
    pin::{self, Pinner},
    runtime,
};
use crate::collect::cgroup::{CgroupLayout, CgroupVersion};

/// What applying an action changed.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub before: Option<String>,
    pub after: Option<String>,
    pub cgroup_ino: Option<u64>,
    /// It stays in force until undone (a one-shot like an unload does not).
    pub lasting: bool,
}

/// How an undo went, for the journal and for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Restored,
    Unpinned,
    /// Someone changed the value since infermem wrote it; it is left as they set it.
    LeftAlone(String),
    /// The cgroup or process is gone, or the pin ended with an earlier agent.
    Gone,
    /// Nothing to undo (a one-shot action).
    Nothing,
    Failed(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Restored => f.write_str("restored"),
            Outcome::Unpinned => f.write_str("unpinned"),
            Outcome::LeftAlone(now) => write!(f, "left alone: changed since to {now}"),
            Outcome::Gone => f.write_str("nothing to restore: gone"),
            Outcome::Nothing => f.write_str("nothing to undo"),
            Outcome::Failed(why) => write!(f, "revert failed: {why}"),
        }
    }
}

/// The system the actions change: the memory cgroup hierarchy and the pins.
pub struct Target {
    cgroups: Option<(CgroupVersion, PathBuf)>,
    pinner: Pinner,
}

impl Target {
    /// The host's memory cgroup hierarchy (if any), and a pinner.
    pub fn new(layout: &CgroupLayout, pinner: Pinner) -> Target {
        let hierarchy = layout
            .memory_hierarchy()
            .map(|(version, mount)| (version, mount.to_owned()));
        Target::with_hierarchy(hierarchy, pinner)
    }

    /// A memory cgroup hierarchy of this version mounted there (tests use a directory).
    pub fn with_hierarchy(cgroups: Option<(CgroupVersion, PathBuf)>, pinner: Pinner) -> Target {
        Target { cgroups, pinner }
    }

    /// The cgroup version, when there is a memory hierarchy.
    pub fn cgroup_version(&self) -> Option<CgroupVersion> {
        self.cgroups.as_ref().map(|(v, _)| *v)
    }

    /// Applies `action` (`previous`: the same thing's record in force, when the value changes).
    pub fn apply(&mut self, action: &Action, previous: Option<&Record>) -> Result<Applied, String> {
        match action {
            Action::CgroupWrite {
                cgroup,
                file,
                value,
            } => self.write_cgroup(cgroup, file, *value, previous),
            Action::OomScoreAdj { process, value } => {
                same_process(process)?;
                let change =
                    knobs::write_oom_score_adj(process.pid, *value).map_err(|e| e.to_string())?;
                Ok(lasting(change))
            }
            Action::Pin {
                file,
                dev,
                ino,
                holder,
                manual,
                ..
            } => self.pin(file, (*dev, *ino), holder.as_ref(), *manual),
            Action::UnloadIdleModels { process, runtime } => unload_idle(process, runtime),
        }
    }

    /// Undoes an applied action, if what it changed still holds what it wrote.
    pub fn revert(&mut self, record: &Record) -> Outcome {
        let change = Change {
            before: record.before.clone().unwrap_or_default(),
            after: record.after.clone().unwrap_or_default(),
            cgroup_ino: record.cgroup_ino,
        };
        let reverted = match &record.action {
            Action::CgroupWrite { cgroup, file, .. } => match self.cgroup_dir(cgroup) {
                Ok(dir) => knobs::revert_cgroup(&dir, file, &change),
                Err(why) => return Outcome::Failed(why),
            },
            Action::OomScoreAdj { process, .. } => match same_process(process) {
                Ok(()) => knobs::revert_oom_score_adj(process.pid, &change),
                Err(_) => Ok(Reverted::Gone),
            },
            Action::Pin {
                dev,
                ino,
                holder,
                manual,
                ..
            } => return self.unpin((*dev, *ino), holder_of(holder.as_ref(), *manual)),
            Action::UnloadIdleModels { .. } => return Outcome::Nothing,
        };
        match reverted {
            Ok(Reverted::Restored) => Outcome::Restored,
            Ok(Reverted::ChangedSince(now)) => Outcome::LeftAlone(now),
            Ok(Reverted::Gone) => Outcome::Gone,
            Err(err) => Outcome::Failed(err.to_string()),
        }
    }

    /// The pins, with their resident bytes now.
    pub fn pins(&self) -> Vec<pin::PinStatus> {
        self.pinner.in_force()
    }

    fn cgroup_dir(&self, cgroup: &str) -> Result<PathBuf, String> {
        let (_, mount) = self
            .cgroups
            .as_ref()
            .ok_or("no memory cgroup hierarchy is mounted")?;
        knobs::cgroup_dir(mount, cgroup).map_err(|e| e.to_string())
    }

    fn write_cgroup(
        &mut self,
        cgroup: &str,
        file: &str,
        value: u64,
        previous: Option<&Record>,
    ) -> Result<Applied, String> {
        let dir = self.cgroup_dir(cgroup)?;
        if let Some(previous) = previous
            && previous.cgroup_ino.is_some()
            && previous.cgroup_ino != inode(&dir)
        {
            return Err(format!(
                "{cgroup} was removed and made again since infermem wrote it"
            ));
        }
        let version = self.cgroup_version().unwrap_or(CgroupVersion::V2);
        let text = knobs::render_for(version, value);
        let change = knobs::write_cgroup(&dir, file, &text).map_err(|e| e.to_string())?;
        Ok(lasting(change))
    }

    fn pin(
        &mut self,
        file: &std::path::Path,
        id: (u64, u64),
        holder: Option<&ProcessRef>,
        manual: bool,
    ) -> Result<Applied, String> {
        if let Some(process) = holder {
            same_process(process)?;
        }
        let pinned = self
            .pinner
            .pin(file, Some(id), holder_of(holder, manual))
            .map_err(|e| e.to_string())?;
        Ok(Applied {
            before: Some("not pinned".to_owned()),
            after: Some(format!("pinned, {} bytes resident", pinned.resident_bytes)),
            cgroup_ino: None,
            lasting: true,
        })
    }

    fn unpin(&mut self, id: (u64, u64), holder: pin::Holder) -> Outcome {
        if self.pinner.unpin(id, holder) {
            Outcome::Unpinned
        } else {
            Outcome::Gone
        }
    }
}

/// The pinner's holder for a pin: the process for the policy's pins, "by hand" for others.
fn holder_of(holder: Option<&ProcessRef>, manual: bool) -> pin::Holder {
    match (holder, manual) {
        (Some(p), false) => pin::Holder::Process {
            pid: p.pid,
            start_time: p.start_time,
        },
        _ => pin::Holder::Manual,
    }
}

fn lasting(change: Change) -> Applied {
    Applied {
        before: Some(change.before),
        after: Some(change.after),
        cgroup_ino: change.cgroup_ino,
        lasting: true,
    }
}

fn inode(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

/// Checks that the pid is still the process the action was decided for.
pub fn same_process(process: &ProcessRef) -> Result<(), String> {
    let stat = procfs::process::Process::new(process.pid as i32)
        .and_then(|p| p.stat())
        .map_err(|_| format!("pid {} has exited", process.pid))?;
    if stat.starttime == process.start_time {
        Ok(())
    } else {
        Err(format!("pid {} is another process now", process.pid))
    }
}

/// Asks the runtime to unload every model but the one used last (the latest to expire).
fn unload_idle(process: &ProcessRef, runtime_id: &str) -> Result<Applied, String> {
    same_process(process)?;
    let control =
        runtime::connect(process.pid, process.start_time, runtime_id).map_err(|e| e.to_string())?;
    let mut loaded = control.loaded_models().map_err(|e| e.to_string())?;
    loaded.sort_by(|a, b| a.expires_at.cmp(&b.expires_at));
    let names = |models: &[runtime::LoadedModel]| {
        models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let before = names(&loaded);
    let kept = loaded.pop();
    for model in &loaded {
        control.unload(&model.name).map_err(|e| e.to_string())?;
    }
    Ok(Applied {
        before: Some(before),
        after: Some(names(kept.as_slice())),
        cgroup_ino: None,
        lasting: false,
    })
}
