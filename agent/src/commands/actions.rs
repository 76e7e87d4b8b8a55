//! `infermem actions` and `infermem revert`, and the agent's side of `pin`/`unpin`: through
//! the running agent; without one, from the journal that an agent left behind.

use std::{path::Path, process::ExitCode};

use super::{ClientOptions, block_on, daemon, exit_code, print_json, print_reply};
use crate::{
    act::{apply::Target, engine::Engine, journal, pin::Pinner, safety::Guard},
    api::proto,
    collect::cgroup::CgroupLayout,
    config,
    daemon::actions::engine_options,
    report::text::escape,
    units::format_bytes,
};

/// `infermem actions`: the mode, what is in force, what the policy wishes, the pins.
pub fn actions(options: &ClientOptions, config: Option<&Path>, json: bool) -> ExitCode {
    match daemon(options) {
        Ok(Some(mut client)) => print_reply(block_on(client.actions()), json, render),
        Ok(None) => leftovers(config, json),
        Err(err) => exit_code(Err(err)),
    }
}

/// `infermem revert`: undoes every action in force (the agent's, or what a crashed agent
/// left in its journal).
pub fn revert(options: &ClientOptions, config: Option<&Path>) -> ExitCode {
    let lines = match daemon(options) {
        Ok(Some(mut client)) => match block_on(client.revert()) {
            Ok(reply) => reply.lines,
            Err(err) => return exit_code(Err(err)),
        },
        Ok(None) => match revert_journal(config) {
            Ok(lines) => lines,
            Err(err) => {
                eprintln!("error: {}", escape(&err));
                return ExitCode::FAILURE;
            }
        },
        Err(err) => return exit_code(Err(err)),
    };
    if lines.is_empty() {
        println!("nothing in force");
    }
    for line in lines {
        println!("{}", escape(&line));
    }
    ExitCode::SUCCESS
}

/// `infermem pin`/`unpin` through the running agent: None when no agent runs.
pub fn pin_through_agent(
    options: &ClientOptions,
    request: proto::PinRequest,
    pin: bool,
) -> Option<ExitCode> {
    let mut client = match block_on(crate::api::client::Client::connect(options.socket)) {
        Ok(Some(client)) => client,
        Ok(None) => return None,
        Err(err) => return Some(exit_code(Err(err))),
    };
    Some(match block_on(client.pin(request, pin)) {
        Ok(reply) => {
            for line in reply.lines {
                println!("{}", escape(&line));
            }
            ExitCode::SUCCESS
        }
        Err(err) => exit_code(Err(err)),
    })
}

/// Without an agent: what the journal says is still in force.
fn leftovers(config: Option<&Path>, json: bool) -> ExitCode {
    let path = match config::load(config) {
        Ok((config, _)) => config.policy.journal,
        Err(err) => {
            eprintln!("error: {}", escape(&err.to_string()));
            return ExitCode::FAILURE;
        }
    };
    match journal::read_in_force(&path) {
        Ok((in_force, _)) if json => {
            print_json(&in_force.values().collect::<Vec<_>>());
            ExitCode::SUCCESS
        }
        Ok((in_force, _)) => {
            println!(
                "no agent runs; the journal {} says in force:",
                path.display()
            );
            if in_force.is_empty() {
                println!("  nothing");
            }
            for record in in_force.values() {
                println!("  {}", escape(&record.action.describe()));
            }
            if !in_force.is_empty() {
                println!("`infermem revert` (or starting the agent) undoes them");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {}: {err}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// Without an agent: reverts what the journal says is in force, as a starting agent would.
fn revert_journal(config: Option<&Path>) -> Result<Vec<String>, String> {
    let (config, _) = config::load(config).map_err(|e| e.to_string())?;
    let layout = CgroupLayout::detect();
    let mut engine = Engine::start(
        engine_options(&config.policy),
        Guard::for_this_agent(&layout),
        Target::new(&layout, Pinner::new(0, 0)),
        None,
    )
    .map_err(|e| format!("{}: {e}", config.policy.journal.display()))?;
    Ok(engine.take_restored())
}

/// `infermem actions` as text.
fn render(reply: &proto::ActionsReply) -> String {
    let mut out = format!("mode: {}    journal: {}\n", reply.mode, reply.journal);
    out += &format!("in force ({}):\n", reply.in_force.len());
    for entry in &reply.in_force {
        let before = entry.before.as_deref().unwrap_or("?");
        let after = entry.after.as_deref().unwrap_or("?");
        out += &format!(
            "  {}  [{before} -> {after}]\n      {}\n",
            escape(&entry.description),
            escape(&entry.reason)
        );
    }
    out += &format!("wished by the policy now ({}):\n", reply.wished.len());
    for entry in &reply.wished {
        out += &format!(
            "  {}\n      {}\n",
            escape(&entry.description),
            escape(&entry.reason)
        );
    }
    for pin in &reply.pins {
        out += &format!(
            "pinned: {} {} ({} resident) for {}\n",
            escape(&pin.path),
            format_bytes(pin.bytes),
            format_bytes(pin.resident_bytes),
            pin.holders.join(", ")
        );
    }
    out += &format!(
        "alert hooks: {} delivered, {} failed, {} dropped, {} debounced\n",
        reply.hooks_delivered, reply.hooks_failed, reply.hooks_dropped, reply.hooks_suppressed
    );
    if reply.rate_limited > 0 {
        out += &format!("held back by the rate limit: {}\n", reply.rate_limited);
    }
    out
}
