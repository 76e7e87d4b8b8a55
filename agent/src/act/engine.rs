//! The engine: takes the actions the policy wishes for, and by mode journals them
//! (`observe`), offers them (`recommend`) or applies them (`enforce`) after the safety
//! checks and within the rate limits; undoes what the policy no longer wishes for; reverts
//! what an earlier run left in force; and answers `infermem actions`, `revert`, `pin` and
//! `unpin`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    Action, Wish,
    apply::{self, Target},
    hooks::{AlertEvent, HookStats, Hooks},
    journal::{Event, Journal, Record},
    safety::Guard,
};
use crate::{daemon::unix_now, policy::PolicyMode};

/// A one-shot action (unloading a runtime's models) is not repeated within this time.
const ONE_SHOT_COOLDOWN: Duration = Duration::from_secs(300);

/// A failed action is not retried within this time.
const FAILURE_BACKOFF: Duration = Duration::from_secs(60);

/// A cgroup value within this share of the one in force is not rewritten.
const VALUE_SLACK: f64 = 0.05;

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub mode: PolicyMode,
    pub journal: PathBuf,
    pub max_actions_per_minute: u32,
    pub min_change_interval: Duration,
}

/// What `infermem actions` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ActionsView {
    pub mode: PolicyMode,
    pub journal: String,
    /// Applied and not undone.
    pub in_force: Vec<Record>,
    /// What the policy wishes for now (applied or not, by mode).
    pub wished: Vec<Wish>,
    /// Pins with their resident bytes.
    pub pins: Vec<super::pin::PinStatus>,
    /// Actions held back by the rate limit since the start.
    pub rate_limited: u64,
    /// The alert hooks' deliveries, failures, drops and debounced events.
    pub hooks: HookStats,
}

/// The engine's state.
pub struct Engine {
    options: EngineOptions,
    guard: Guard,
    target: Target,
    journal: Journal,
    in_force: BTreeMap<String, Record>,
    wished: BTreeMap<String, Wish>,
    /// Why a wish was last refused or failed, and when: journalled once, retried later.
    held: HashMap<String, (String, Instant)>,
    last_change: HashMap<String, Instant>,
    recent: VecDeque<Instant>,
    rate_limited: u64,
    hooks: Option<Arc<Hooks>>,
    /// What was restored at start, a line each.
    restored: Vec<String>,
}

impl Engine {
    /// Opens the journal and reverts what an earlier run left in force.
    pub fn start(
        options: EngineOptions,
        guard: Guard,
        target: Target,
        hooks: Option<Arc<Hooks>>,
    ) -> std::io::Result<Engine> {
        let (journal, leftovers) = Journal::open(&options.journal)?;
        let mut engine = Engine {
            options,
            guard,
            target,
            journal,
            in_force: BTreeMap::new(),
            wished: BTreeMap::new(),
            held: HashMap::new(),
            last_change: HashMap::new(),
            recent: VecDeque::new(),
            rate_limited: 0,
            hooks,
            restored: Vec::new(),
        };
        for (_, record) in leftovers {
            let line = engine.undo(record, Event::Restore, "left in force by an earlier run");
            engine.restored.push(line);
        }
        Ok(engine)
    }

    /// What [`Engine::start`] restored, a line each (once).
    pub fn take_restored(&mut self) -> Vec<String> {
        std::mem::take(&mut self.restored)
    }

    /// Changes the mode and limits (a reload); a mode other than enforce undoes the
    /// policy's actions at the next [`Engine::reconcile`].
    pub fn reconfigure(&mut self, options: EngineOptions) {
        if options.journal != self.options.journal {
            tracing::warn!("policy.journal changes only with a restart");
        }
        self.options = EngineOptions {
            journal: self.options.journal.clone(),
            ..options
        };
        self.wished.clear();
    }

    /// Sends later actions to these hooks.
    pub fn set_hooks(&mut self, hooks: Arc<Hooks>) {
        self.hooks = Some(hooks);
    }

    pub fn mode(&self) -> PolicyMode {
        self.options.mode
    }

    /// Brings what is in force in line with the wishes of the policy, by mode.
    pub fn reconcile(&mut self, wishes: Vec<Wish>) {
        let wanted: BTreeMap<String, Wish> =
            wishes.into_iter().map(|w| (w.action.key(), w)).collect();
        let enforcing = self.options.mode == PolicyMode::Enforce;
        let stale: Vec<String> = self
            .in_force
            .iter()
            .filter(|(key, r)| {
                if is_manual(&r.action) {
                    // A pin by hand for a process lasts as long as the process.
                    r.action
                        .process()
                        .is_some_and(|p| apply::same_process(p).is_err())
                } else {
                    !(enforcing && wanted.contains_key(*key))
                }
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(record) = self.in_force.remove(&key) {
                let why = if enforcing {
                    "the policy no longer wishes it"
                } else {
                    "the policy is not enforcing"
                };
                self.undo(record, Event::Revert, why);
            }
        }
        for wish in wanted.values() {
            if enforcing {
                self.enforce(wish);
            } else if self.wished.get(&wish.action.key()) != Some(wish) {
                self.decide(wish);
            }
        }
        self.wished = wanted;
        if let Err(err) = self.rotate() {
            tracing::warn!("journal rotation failed: {err}");
        }
    }

    /// Undoes every action in force (`infermem revert`, or the agent stopping); returns one
    /// line per action.
    pub fn revert_all(&mut self, why: &str) -> Vec<String> {
        let records: Vec<Record> = std::mem::take(&mut self.in_force).into_values().collect();
        records
            .into_iter()
            .map(|record| self.undo(record, Event::Revert, why))
            .collect()
    }

    /// Undoes every action in force and stays in observe mode until the next reload, so
    /// that the policy does not apply them again at its next round (`infermem revert`).
    pub fn revert_and_observe(&mut self) -> Vec<String> {
        let mut lines = self.revert_all("reverted by `infermem revert`");
        if self.options.mode != PolicyMode::Observe {
            self.options.mode = PolicyMode::Observe;
            self.wished.clear();
            lines.push(
                "the policy observes until the agent reloads (SIGHUP) or restarts".to_owned(),
            );
        }
        lines
    }

    /// Pins a file by hand (`infermem pin`), outside the policy but within the budget.
    pub fn pin_by_hand(&mut self, action: Action) -> Result<String, String> {
        let key = action.key();
        if self.in_force.contains_key(&key) {
            return Ok(format!("already in force: {}", action.describe()));
        }
        let wish = Wish {
            action,
            reason: "pinned by hand".to_owned(),
        };
        self.apply(&wish).map(|_| wish.action.describe())
    }

    /// Undoes the pin by hand of the file `(dev, ino)`; says so when the policy pins it too.
    pub fn unpin_by_hand(&mut self, dev: u64, ino: u64) -> Vec<String> {
        let of_file =
            |a: &Action| matches!(a, Action::Pin { dev: d, ino: i, .. } if *d == dev && *i == ino);
        let mut lines: Vec<String> = self
            .in_force
            .remove(&format!("pin:{dev}:{ino}:manual"))
            .map(|record| self.undo(record, Event::Revert, "unpinned by hand"))
            .into_iter()
            .collect();
        if self.in_force.values().any(|r| of_file(&r.action)) {
            lines.push(
                "the policy pins this file too: it stays pinned while a workload rule wishes it"
                    .to_owned(),
            );
        }
        if lines.is_empty() {
            lines.push("that file is not pinned".to_owned());
        }
        lines
    }

    /// What `infermem actions` shows.
    pub fn view(&self) -> ActionsView {
        ActionsView {
            mode: self.options.mode,
            journal: self.journal.path().display().to_string(),
            in_force: self.in_force.values().cloned().collect(),
            wished: self.wished.values().cloned().collect(),
            pins: self.target.pins(),
            rate_limited: self.rate_limited,
            hooks: self.hooks.as_ref().map(|h| h.stats()).unwrap_or_default(),
        }
    }

    /// Journals (and in recommend mode offers) a wish the mode keeps from being applied.
    fn decide(&mut self, wish: &Wish) {
        let verb = match self.options.mode {
            PolicyMode::Recommend => "recommends",
            _ => "would apply",
        };
        tracing::info!(mode = %self.options.mode, reason = %wish.reason, "policy {verb}: {}", wish.action.describe());
        let record = self.record(Event::Decision, &wish.action, &wish.reason);
        self.write(record.clone());
        if self.options.mode == PolicyMode::Recommend {
            self.alert(&record);
        }
    }

    /// Applies a wish in enforce mode, unless it is in force already, held back or refused.
    fn enforce(&mut self, wish: &Wish) {
        let key = wish.action.key();
        if self
            .in_force
            .get(&key)
            .is_some_and(|r| close_enough(&r.action, &wish.action))
        {
            return;
        }
        let now = Instant::now();
        if self.held.get(&key).is_some_and(|(_, at)| now < *at)
            || self.too_soon(&key, &wish.action, now)
        {
            return;
        }
        if let Some(why) = self.guard.refuse(&wish.action) {
            self.hold(&key, Event::Refused, &wish.action, why, FAILURE_BACKOFF);
            return;
        }
        if !self.take_token(now) {
            self.rate_limited += 1;
            return;
        }
        if let Err(why) = self.apply(wish) {
            self.hold(&key, Event::Failed, &wish.action, why, FAILURE_BACKOFF);
        }
    }

    /// Applies an action now and journals it.
    fn apply(&mut self, wish: &Wish) -> Result<(), String> {
        let key = wish.action.key();
        let previous = self.in_force.get(&key).cloned();
        let change = self.target.apply(&wish.action, previous.as_ref())?;
        self.last_change.insert(key.clone(), Instant::now());
        self.held.remove(&key);
        let mut record = self.record(Event::Apply, &wish.action, &wish.reason);
        // A new value keeps the value from before infermem's first write.
        record.before = previous.and_then(|p| p.before).or(change.before);
        record.after = change.after;
        record.cgroup_ino = change.cgroup_ino;
        tracing::info!(reason = %wish.reason, "applied: {}", wish.action.describe());
        self.write(record.clone());
        self.alert(&record);
        if change.lasting {
            self.in_force.insert(key, record);
        }
        Ok(())
    }

    /// Undoes an applied action, journals how it went, and returns that as a line.
    fn undo(&mut self, record: Record, event: Event, why: &str) -> String {
        let outcome = self.target.revert(&record);
        let mut undone = self.record(event, &record.action, &format!("{why}: {outcome}"));
        undone.before = record.after.clone();
        undone.after = record.before.clone();
        undone.cgroup_ino = record.cgroup_ino;
        tracing::info!("{}: {} ({why})", outcome, record.action.describe());
        self.write(undone.clone());
        self.alert(&undone);
        format!("{}: {outcome}", record.action.describe())
    }

    /// Journals a refusal or failure once, and holds the action back for `backoff`.
    fn hold(&mut self, key: &str, event: Event, action: &Action, why: String, backoff: Duration) {
        let repeated = self.held.get(key).is_some_and(|(last, _)| *last == why);
        if !repeated {
            tracing::warn!("{}: {why}", action.describe());
            let record = self.record(event, action, &why);
            self.write(record);
        }
        self.held
            .insert(key.to_owned(), (why, Instant::now() + backoff));
    }

    /// Whether the thing `key` changes was changed too recently to change again.
    fn too_soon(&self, key: &str, action: &Action, now: Instant) -> bool {
        let gap = match action {
            Action::UnloadIdleModels { .. } => ONE_SHOT_COOLDOWN,
            _ => self.options.min_change_interval,
        };
        self.last_change
            .get(key)
            .is_some_and(|at| now.duration_since(*at) < gap)
    }

    /// The agent-wide rate limit: at most `max_actions_per_minute` in any minute.
    fn take_token(&mut self, now: Instant) -> bool {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.options.max_actions_per_minute as usize {
            return false;
        }
        self.recent.push_back(now);
        true
    }

    fn record(&self, event: Event, action: &Action, reason: &str) -> Record {
        Record {
            seq: 0,
            time: unix_now(),
            event,
            mode: self.options.mode,
            id: action.key(),
            action: action.clone(),
            before: None,
            after: None,
            cgroup_ino: None,
            reason: reason.to_owned(),
            agent_pid: self.guard.agent_pid,
        }
    }

    fn write(&mut self, record: Record) {
        if let Err(err) = self.journal.append(record) {
            tracing::error!(journal = %self.journal.path().display(), "journal write failed: {err}");
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let in_force: Vec<Record> = self.in_force.values().cloned().collect();
        self.journal.rotate_if_large(&in_force)
    }

    /// Sends an action to the alert hooks.
    fn alert(&self, record: &Record) {
        let Some(hooks) = &self.hooks else {
            return;
        };
        let body = serde_json::to_value(record).unwrap_or_default();
        hooks.fire(AlertEvent {
            kind: "action".into(),
            key: record.id.clone(),
            body,
        });
    }
}

impl Drop for Engine {
    /// The agent stopping undoes what it applied.
    fn drop(&mut self) {
        self.revert_all("the agent stopped");
    }
}

/// Pins made by hand stay until unpinned by hand (or their process exits).
fn is_manual(action: &Action) -> bool {
    matches!(action, Action::Pin { manual: true, .. })
}

/// Whether the action in force already does what `wished` asks (cgroup values within
/// [`VALUE_SLACK`]).
fn close_enough(in_force: &Action, wished: &Action) -> bool {
    match (in_force, wished) {
        (Action::CgroupWrite { value: a, file, .. }, Action::CgroupWrite { value: b, .. }) => {
            // A throttle stays where it was set: the usage it holds down is no reason to
            // tighten it further.
            let throttle_holds = file == "memory.high" && b <= a;
            let (a, b) = (*a as f64, *b as f64);
            throttle_holds || a == b || (a - b).abs() <= VALUE_SLACK * a.max(b)
        }
        (a, b) => a == b,
    }
}

#[cfg(test)]
mod tests;
