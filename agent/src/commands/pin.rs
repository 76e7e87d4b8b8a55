//! `infermem pin <pid|model-file> [--hold]` and `infermem unpin`: through the running agent
//! (the pin then lasts until `unpin`, the process's exit or the agent's stop); without one,
//! `--hold` pins in this command until Ctrl-C or the process's exit.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use serde::Serialize;

use super::{ClientOptions, actions::pin_through_agent, block_on};
use crate::{
    act::{
        ProcessRef,
        apply::same_process,
        pin::{FileId, Holder, PinOutcome, Pinner, mapped_file_id},
    },
    api::proto,
    collect::{maps, process},
    model::discovery,
    policy::PolicyConfig,
    report::text::escape,
    units::format_bytes,
};

/// What to pin: a process's model files, or one file.
#[derive(Debug, Clone)]
pub enum PinTarget {
    Pid(u32),
    File(PathBuf),
}

impl PinTarget {
    /// A pid when the argument is a number, a file otherwise.
    pub fn parse(text: &str) -> PinTarget {
        match text.parse() {
            Ok(pid) => PinTarget::Pid(pid),
            Err(_) => PinTarget::File(PathBuf::from(text)),
        }
    }

    fn request(&self) -> proto::PinRequest {
        match self {
            PinTarget::Pid(pid) => proto::PinRequest {
                pid: Some(*pid),
                path: String::new(),
            },
            PinTarget::File(path) => proto::PinRequest {
                pid: None,
                path: absolute(path).display().to_string(),
            },
        }
    }
}

/// How often a held pin checks that its process still runs.
const HOLD_CHECK: Duration = Duration::from_secs(1);

/// `infermem pin`.
pub fn pin(options: &ClientOptions, target: &PinTarget, hold: bool, json: bool) -> ExitCode {
    if let Some(code) = pin_through_agent(options, target.request(), true) {
        if hold && code == ExitCode::SUCCESS {
            wait_for_stop(None);
            return pin_through_agent(options, target.request(), false).unwrap_or(code);
        }
        return code;
    }
    if !hold {
        eprintln!(
            "error: no infermem agent runs: a pin outlives this command only through the agent \
             (`infermem run`); `--hold` pins until Ctrl-C"
        );
        return ExitCode::FAILURE;
    }
    match hold_standalone(target, json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", escape(&err));
            ExitCode::FAILURE
        }
    }
}

/// `infermem unpin`: only the agent holds pins beyond a command.
pub fn unpin(options: &ClientOptions, target: &PinTarget) -> ExitCode {
    pin_through_agent(options, target.request(), false).unwrap_or_else(|| {
        eprintln!(
            "error: no infermem agent runs, so nothing is pinned beyond a command \
             (a `pin --hold` lets go when it stops)"
        );
        ExitCode::FAILURE
    })
}

/// One pinned file, as `--json` prints it (a JSON line, `"event": "pinned"`).
#[derive(Debug, Serialize)]
struct Pinned {
    event: &'static str,
    path: PathBuf,
    bytes: u64,
    resident_before: u64,
    resident_bytes: u64,
}

/// Pins in this process until Ctrl-C, SIGTERM or the target process's exit.
fn hold_standalone(target: &PinTarget, json: bool) -> Result<(), String> {
    let defaults = PolicyConfig::default();
    let mut pinner = Pinner::new(defaults.pin_budget.0, defaults.pin_reserve.0);
    let (files, process) = resolve(target)?;
    let holder = process
        .as_ref()
        .map_or(Holder::Manual, |p| Holder::Process {
            pid: p.pid,
            start_time: p.start_time,
        });
    let mut pinned = Vec::new();
    for (path, id) in &files {
        let outcome = pinner.pin(path, *id, holder).map_err(|e| e.to_string())?;
        pinned.push(report(path, outcome));
    }
    if json {
        for p in &pinned {
            println!("{}", serde_json::to_string(p).expect("serialises"));
        }
        println!(r#"{{"event":"holding"}}"#);
    } else {
        for p in &pinned {
            println!(
                "pinned {} ({}): {} resident before, {} now",
                escape(&p.path.display().to_string()),
                format_bytes(p.bytes),
                format_bytes(p.resident_before),
                format_bytes(p.resident_bytes)
            );
        }
        println!("holding the pin; Ctrl-C releases it");
    }
    let why = wait_for_stop(process.as_ref());
    drop(pinner);
    eprintln!("unpinned ({why})");
    Ok(())
}

fn report(path: &Path, outcome: PinOutcome) -> Pinned {
    Pinned {
        event: "pinned",
        path: path.to_owned(),
        bytes: outcome.bytes,
        resident_before: outcome.resident_before,
        resident_bytes: outcome.resident_bytes,
    }
}

/// A file to pin, with the identity it must have.
type FileToPin = (PathBuf, Option<FileId>);

/// The files to pin, and the process they are for.
fn resolve(target: &PinTarget) -> Result<(Vec<FileToPin>, Option<ProcessRef>), String> {
    match target {
        PinTarget::File(path) => Ok((vec![(absolute(path), None)], None)),
        PinTarget::Pid(pid) => {
            let id = process::identity(*pid).map_err(|e| e.to_string())?;
            let files = model_files(*pid)?;
            if files.is_empty() {
                return Err(format!("pid {pid} maps no model file"));
            }
            let process = ProcessRef {
                pid: id.pid,
                start_time: id.start_time,
                comm: id.comm,
            };
            Ok((files, Some(process)))
        }
    }
}

/// The files `pid` maps that are model files (recognised by format), or that are mapped
/// for at least the probes' model size (64 MiB), each with the identity of its mapping.
fn model_files(pid: u32) -> Result<Vec<FileToPin>, String> {
    let min_bytes = infermem_common::BucketPolicy::HOST.min_mapping_bytes;
    let vmas = maps::vmas(pid, false).map_err(|e| e.to_string())?;
    let files = maps::mapped_files(&vmas, discovery::MIN_MODEL_BYTES)
        .into_iter()
        .filter(|f| !f.deleted && (f.size >= min_bytes || discovery::sniff(&f.path).is_some()))
        .filter_map(|f| {
            let (start, end) = *f.ranges.first()?;
            let (id, _) = mapped_file_id(pid, start, end)?;
            Some((f.path, Some(id)))
        })
        .collect();
    Ok(files)
}

/// Waits for SIGINT or SIGTERM, or for `process` to exit; says which.
fn wait_for_stop(process: Option<&ProcessRef>) -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    block_on(async {
        let (Ok(mut interrupt), Ok(mut terminate)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return "no signal handler could be installed";
        };
        let mut check = tokio::time::interval(HOLD_CHECK);
        loop {
            tokio::select! {
                _ = interrupt.recv() => return "interrupted",
                _ = terminate.recv() => return "terminated",
                _ = check.tick() => {
                    if process.is_some_and(|p| same_process(p).is_err()) {
                        return "the process exited";
                    }
                }
            }
        }
    })
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}
