//! What `infermem top` shows: the agent's latest replies ([`Data`]) and the state of the view
//! (sort, selection, inspect pane). [`super::render`] draws it; [`super::input`] changes it.

use std::{cmp::Ordering, time::Duration};

use crate::api::proto;

/// The agent's answers of one refresh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Data {
    /// `daemon`, or `standalone` when `top` runs the pipeline itself.
    pub mode: String,
    /// When the replies were read (seconds since the Unix epoch).
    pub refreshed_unix: f64,
    pub workloads: Vec<proto::Workload>,
    pub host: Option<proto::HostStatus>,
    /// Oldest first, as `status` lists them.
    pub oom_kills: Vec<proto::OomKill>,
    pub actions: Actions,
    /// Why the last refresh failed (the data are then the refresh before's).
    pub error: Option<String>,
}

/// The actions in force, or why they are not shown.
#[derive(Debug, Clone, PartialEq)]
pub enum Actions {
    InForce(Vec<proto::ActionEntry>),
    /// The agent refuses the actions view to this caller (root or its admin group only).
    NotVisible,
    /// No actions to show, and why (e.g. standalone: nothing acts).
    Unavailable(String),
}

impl Default for Actions {
    fn default() -> Actions {
        Actions::Unavailable("not read yet".to_owned())
    }
}

/// The order of the workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    /// Worst level first, then the nearest OOM, then the largest footprint.
    Risk,
    /// Largest footprint (resident + swapped out) first.
    Memory,
    /// Lowest pid first.
    Pid,
    /// By name (executable or comm).
    Name,
}

impl Sort {
    /// The sort the `s` key switches to.
    pub fn next(self) -> Sort {
        match self {
            Sort::Risk => Sort::Memory,
            Sort::Memory => Sort::Pid,
            Sort::Pid => Sort::Name,
            Sort::Name => Sort::Risk,
        }
    }

    /// Its name in the header.
    pub fn label(self) -> &'static str {
        match self {
            Sort::Risk => "risk",
            Sort::Memory => "memory",
            Sort::Pid => "pid",
            Sort::Name => "name",
        }
    }

    fn compare(self, a: &proto::Workload, b: &proto::Workload) -> Ordering {
        let order = match self {
            Sort::Risk => level_rank(b)
                .cmp(&level_rank(a))
                .then(eta(a).total_cmp(&eta(b)))
                .then(footprint(b).cmp(&footprint(a))),
            Sort::Memory => footprint(b).cmp(&footprint(a)),
            Sort::Pid => Ordering::Equal,
            Sort::Name => display_name(a).cmp(display_name(b)),
        };
        order.then(a.pid.cmp(&b.pid))
    }
}

/// What the body of the screen shows.
#[derive(Debug, Clone, PartialEq)]
pub enum View {
    /// The workloads and the recent events.
    Table,
    /// One process's inspect report.
    Inspect(Inspect),
}

/// The inspect pane of one process.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspect {
    pub pid: u32,
    /// Its name as the table showed it.
    pub name: String,
    pub body: InspectBody,
    /// The first line shown.
    pub scroll: u16,
}

/// The inspect report, while it is sampled, once it came, or why it did not.
#[derive(Debug, Clone, PartialEq)]
pub enum InspectBody {
    Sampling,
    /// The text report, a line each, escaped.
    Report(Vec<String>),
    Failed(String),
}

impl InspectBody {
    /// How many lines it has.
    pub fn line_count(&self) -> usize {
        match self {
            InspectBody::Report(lines) => lines.len(),
            InspectBody::Sampling | InspectBody::Failed(_) => 1,
        }
    }
}

/// Everything on the screen.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub data: Data,
    /// How often the data are refreshed.
    pub interval: Duration,
    pub sort: Sort,
    /// The sort's order reversed.
    pub reversed: bool,
    /// The selected workload, by pid: the selection follows it through sorts and refreshes.
    pub selected: Option<u32>,
    pub view: View,
}

impl Model {
    /// The table view of `data`, sorted by risk, its first row selected.
    pub fn new(data: Data, interval: Duration) -> Model {
        let mut model = Model {
            data,
            interval,
            sort: Sort::Risk,
            reversed: false,
            selected: None,
            view: View::Table,
        };
        model.keep_selection();
        model
    }

    /// The workloads in the current order.
    pub fn rows(&self) -> Vec<&proto::Workload> {
        let mut rows: Vec<&proto::Workload> = self.data.workloads.iter().collect();
        rows.sort_by(|a, b| {
            let order = self.sort.compare(a, b);
            if self.reversed {
                order.reverse()
            } else {
                order
            }
        });
        rows
    }

    /// The selected row's index in [`Model::rows`].
    pub fn selected_index(&self) -> Option<usize> {
        let pid = self.selected?;
        self.rows().iter().position(|w| w.pid == pid)
    }

    /// Moves the selection `delta` rows down (up when negative), within the table.
    pub fn move_selection(&mut self, delta: isize) {
        let rows = self.rows();
        let Some(last) = rows.len().checked_sub(1) else {
            return;
        };
        let at = self.selected_index().unwrap_or(0);
        let to = at.saturating_add_signed(delta).min(last);
        self.selected = Some(rows[to].pid);
    }

    /// Takes a refresh: new data, or the error that kept the old ones.
    pub fn refresh(&mut self, fetched: Result<Data, String>) {
        match fetched {
            Ok(data) => self.data = data,
            Err(error) => self.data.error = Some(error),
        }
        self.keep_selection();
    }

    /// Opens the inspect pane of the selected workload (sampling); its pid, if one is selected.
    pub fn open_inspect(&mut self) -> Option<u32> {
        let pid = self.selected?;
        let name = self
            .data
            .workloads
            .iter()
            .find(|w| w.pid == pid)
            .map(|w| display_name(w).to_owned())?;
        self.view = View::Inspect(Inspect {
            pid,
            name,
            body: InspectBody::Sampling,
            scroll: 0,
        });
        Some(pid)
    }

    /// Shows the inspect report of `pid` (if its pane is still open).
    pub fn show_inspect(&mut self, pid: u32, body: InspectBody) {
        if let View::Inspect(inspect) = &mut self.view
            && inspect.pid == pid
        {
            inspect.body = body;
        }
    }

    /// Keeps the selected pid if it is still listed, else selects the first row.
    fn keep_selection(&mut self) {
        let listed = |pid| self.data.workloads.iter().any(|w| w.pid == pid);
        if !self.selected.is_some_and(listed) {
            self.selected = self.rows().first().map(|w| w.pid);
        }
    }
}

/// A workload's name: its executable's, or its comm when that is unknown.
pub fn display_name(w: &proto::Workload) -> &str {
    if w.executable.is_empty() {
        &w.comm
    } else {
        &w.executable
    }
}

/// Resident and swapped-out bytes.
pub fn footprint(w: &proto::Workload) -> u64 {
    w.rss_bytes.saturating_add(w.swap_bytes)
}

/// critical 3, elevated 2, ok 1, anything else 0.
fn level_rank(w: &proto::Workload) -> u8 {
    match w.risk.as_ref().map(|r| r.level.as_str()) {
        Some("critical") => 3,
        Some("elevated") => 2,
        Some("ok") => 1,
        _ => 0,
    }
}

/// The time to OOM, infinite when there is none.
fn eta(w: &proto::Workload) -> f64 {
    w.risk
        .as_ref()
        .and_then(|r| r.eta_seconds)
        .unwrap_or(f64::INFINITY)
}
