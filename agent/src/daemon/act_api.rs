//! The local API's action requests: `infermem actions`, `revert`, `pin` and `unpin`, passed
//! to the actions thread. Only root and the admin group may call them: actions concern
//! every user's processes.

use std::{os::unix::fs::MetadataExt, path::Path, sync::mpsc};

use super::{
    Agent,
    actions::{Command, REPLY_TIMEOUT},
};
use crate::{
    act::{Action, ProcessRef, engine::ActionsView, journal::Record},
    api::{Peer, error, proto},
};

/// The actions view, for root and the admin group.
pub fn actions(agent: &Agent, peer: &Peer) -> Result<proto::ActionsReply, proto::Error> {
    allowed(peer)?;
    let view = agent
        .act()
        .actions
        .as_ref()
        .map(|a| a.view())
        .ok_or_else(|| error("unavailable", "this agent runs no actions thread"))?;
    Ok(reply(view))
}

/// Undoes every action in force.
pub fn revert(agent: &Agent, peer: &Peer) -> Result<proto::ActReply, proto::Error> {
    allowed(peer)?;
    let (reply, answer) = mpsc::channel();
    send(agent, Command::Revert(reply))?;
    let lines = wait(answer)?;
    Ok(proto::ActReply { lines })
}

/// Pins, or unpins, a process's model files or one file.
pub fn pin(
    agent: &Agent,
    peer: &Peer,
    request: proto::PinRequest,
    pin: bool,
) -> Result<proto::ActReply, proto::Error> {
    allowed(peer)?;
    let actions = match request.pid {
        Some(pid) => process_pins(agent, pid)?,
        None => vec![file_pin(Path::new(&request.path))?],
    };
    let mut lines = Vec::new();
    for action in actions {
        if pin {
            let (reply, answer) = mpsc::channel();
            send(agent, Command::Pin(action, reply))?;
            lines.push(wait(answer)?.map_err(|why| error("failed", why))?);
        } else if let Action::Pin { dev, ino, .. } = action {
            let (reply, answer) = mpsc::channel();
            send(agent, Command::Unpin { dev, ino, reply })?;
            lines.extend(wait(answer)?);
        }
    }
    Ok(proto::ActReply { lines })
}

fn allowed(peer: &Peer) -> Result<(), proto::Error> {
    if peer.sees_all {
        Ok(())
    } else {
        Err(error(
            "permission_denied",
            "actions concern every user's processes: root or a member of api.admin_group only",
        ))
    }
}

fn send(agent: &Agent, command: Command) -> Result<(), proto::Error> {
    let stage = agent.act();
    let actions = stage
        .actions
        .as_ref()
        .ok_or_else(|| error("unavailable", "this agent runs no actions thread"))?;
    actions
        .send(command)
        .map_err(|why| error("unavailable", why))
}

fn wait<T>(answer: mpsc::Receiver<T>) -> Result<T, proto::Error> {
    answer
        .recv_timeout(REPLY_TIMEOUT)
        .map_err(|_| error("unavailable", "the actions thread did not answer in time"))
}

/// Pins by hand of the model files a process maps, each the very file of its mapping.
fn process_pins(agent: &Agent, pid: u32) -> Result<Vec<Action>, proto::Error> {
    let (process, models) = super::actions::model_files_of(agent, pid)
        .ok_or_else(|| error("no_such_process", format!("pid {pid} is not tracked")))?;
    if models.is_empty() {
        return Err(error(
            "bad_request",
            format!("pid {pid} maps no model file infermem recognises"),
        ));
    }
    Ok(models
        .into_iter()
        .map(|m| Action::Pin {
            file: m.path.into(),
            dev: m.dev,
            ino: m.ino,
            bytes: m.bytes,
            holder: Some(process.clone()),
            manual: true,
        })
        .collect())
}

/// A pin by hand of one file, by path.
fn file_pin(path: &Path) -> Result<Action, proto::Error> {
    let meta = std::fs::metadata(path)
        .map_err(|e| error("bad_request", format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(error(
            "bad_request",
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(Action::Pin {
        file: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
        bytes: meta.len(),
        holder: None::<ProcessRef>,
        manual: true,
    })
}

fn reply(view: ActionsView) -> proto::ActionsReply {
    proto::ActionsReply {
        mode: view.mode.to_string(),
        journal: view.journal,
        in_force: view.in_force.iter().map(entry).collect(),
        wished: view
            .wished
            .iter()
            .map(|w| proto::ActionEntry {
                id: w.action.key(),
                description: w.action.describe(),
                reason: w.reason.clone(),
                action_json: serde_json::to_string(&w.action).unwrap_or_default(),
                ..Default::default()
            })
            .collect(),
        pins: view
            .pins
            .iter()
            .map(|p| proto::PinEntry {
                path: p.path.display().to_string(),
                bytes: p.bytes,
                resident_bytes: p.resident_bytes,
                holders: p.holders.iter().map(|h| h.to_string()).collect(),
            })
            .collect(),
        rate_limited: view.rate_limited,
        hooks_delivered: view.hooks.delivered,
        hooks_failed: view.hooks.failed,
        hooks_dropped: view.hooks.dropped,
        hooks_suppressed: view.hooks.suppressed,
    }
}

fn entry(record: &Record) -> proto::ActionEntry {
    proto::ActionEntry {
        id: record.id.clone(),
        description: record.action.describe(),
        before: record.before.clone(),
        after: record.after.clone(),
        reason: record.reason.clone(),
        time: record.time,
        action_json: serde_json::to_string(&record.action).unwrap_or_default(),
    }
}
