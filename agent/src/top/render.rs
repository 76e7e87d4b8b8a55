//! The screen of `infermem top`, drawn from a [`Model`] alone: a header (host memory and
//! risk, the agent, the refresh), the workloads with their memory bars, GPU memory, risk and
//! ETA, the recent events (OOM kills, actions in force), or one process's inspect report; a
//! key line.
//! Text from processes and files is escaped.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Paragraph, Row, Table, TableState, Wrap},
};

use super::model::{Actions, Data, Inspect, InspectBody, Model, View, display_name};
use crate::{
    api::proto,
    report::{
        api_text::{format_eta, workload_vram},
        text::escape,
    },
    units::format_bytes,
};

/// Cells of a memory bar.
pub const BAR_WIDTH: usize = 8;
/// A bar's filled cell.
pub const BAR_FULL: char = '█';
/// A bar's empty cell.
pub const BAR_EMPTY: char = '░';
/// The last cell of a bar filled to 0..=7 eighths.
const BAR_EIGHTHS: [Option<char>; 8] = [
    None,
    Some('▏'),
    Some('▎'),
    Some('▍'),
    Some('▌'),
    Some('▋'),
    Some('▊'),
    Some('▉'),
];
/// Cells of the GPU column: `≥1023 MiB` fits.
const GPU_WIDTH: u16 = 10;

const TABLE_HEADER: [&str; 11] = [
    "PID", "NAME", "RUNTIME", "MODEL", "WEIGHTS", "KV", "ANON", "GPU", "RISK", "ETA", "THRASH",
];

/// Draws the whole screen.
pub fn render(frame: &mut Frame, model: &Model) {
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    render_header(frame, header, model);
    match &model.view {
        View::Table => {
            let [table, events] =
                Layout::vertical([Constraint::Min(4), Constraint::Length(8)]).areas(body);
            render_table(frame, table, model);
            render_events(frame, events, &model.data);
        }
        View::Inspect(inspect) => render_inspect(frame, body, inspect),
    }
    frame.render_widget(Paragraph::new(key_line(model)), footer);
}

fn render_header(frame: &mut Frame, area: Rect, model: &Model) {
    let data = &model.data;
    let order = if model.reversed { ", reversed" } else { "" };
    let agent = Line::from(format!(
        "agent {}   refreshed {} every {:?}   {} workloads   sort: {}{order}",
        escape(&data.mode),
        clock(data.refreshed_unix),
        model.interval,
        data.workloads.len(),
        model.sort.label(),
    ));
    let lines = vec![host_line(data.host.as_ref()), agent];
    let block = Block::bordered().title(" infermem top ");
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

/// Host memory used against its limit, with a bar, and the host's risk.
fn host_line(host: Option<&proto::HostStatus>) -> Line<'static> {
    let Some(host) = host else {
        return Line::from("host  unknown");
    };
    let percent = (host.used_bytes as f64 * 100.0 / host.limit_bytes.max(1) as f64).round();
    let mut spans = vec![
        Span::raw("host  used "),
        bar(host.used_bytes, host.limit_bytes, Color::Blue),
        Span::raw(format!(
            " {} of {} ({percent}%)   risk ",
            format_bytes(host.used_bytes),
            format_bytes(host.limit_bytes)
        )),
    ];
    spans.extend(risk_spans(host.risk.as_ref()));
    Line::from(spans)
}

/// The level (coloured), `ETA …` and `thrashing` when they apply.
fn risk_spans(risk: Option<&proto::Assessment>) -> Vec<Span<'static>> {
    let mut spans = vec![level(risk)];
    if let Some(eta) = risk.and_then(|r| r.eta_seconds) {
        spans.push(Span::raw(format!("  ETA {}", format_eta(eta))));
    }
    if risk.is_some_and(|r| r.thrashing) {
        spans.push(Span::styled("  thrashing", alarm()));
    }
    spans
}

fn render_table(frame: &mut Frame, area: Rect, model: &Model) {
    let host_limit = model.data.host.as_ref().map_or(0, |h| h.limit_bytes);
    let rows: Vec<Row> = model
        .rows()
        .into_iter()
        .map(|w| workload_row(w, host_limit))
        .collect();
    let empty = rows.is_empty();
    let bytes_pair = (BAR_WIDTH + 18) as u16;
    let widths = [
        Constraint::Length(7),
        Constraint::Length(15),
        Constraint::Length(9),
        Constraint::Fill(1),
        Constraint::Length(bytes_pair),
        Constraint::Length(bytes_pair),
        Constraint::Length((BAR_WIDTH + 10) as u16),
        Constraint::Length(GPU_WIDTH),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(6),
    ];
    let header = Row::new(TABLE_HEADER).style(Style::new().add_modifier(Modifier::BOLD));
    let title = if empty {
        " AI workloads: none tracked "
    } else {
        " AI workloads "
    };
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::bordered().title(title))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("▶ ");
    let mut state = TableState::default().with_selected(model.selected_index());
    frame.render_stateful_widget(table, area, &mut state);
}

/// One workload's cells, in [`TABLE_HEADER`]'s order.
fn workload_row(w: &proto::Workload, host_limit: u64) -> Row<'static> {
    let model = std::path::Path::new(&w.model).file_name().map_or_else(
        || "-".to_owned(),
        |n| escape(&n.to_string_lossy()).into_owned(),
    );
    let weights = (w.weights_bytes > 0).then(|| {
        bar_cell(
            (w.weights_resident_bytes, w.weights_bytes),
            Color::Green,
            pair(w.weights_resident_bytes, w.weights_bytes),
        )
    });
    let kv = match (w.kv_bytes_now, w.kv_bytes_max) {
        (Some(now), Some(max)) => Some(bar_cell((now, max), Color::Cyan, pair(now, max))),
        (Some(now), None) => Some(Line::from(format!("{}/?", format_bytes(now)))),
        _ => None,
    };
    let anon = bar_cell(
        (w.anon_bytes, host_limit),
        Color::Yellow,
        format_bytes(w.anon_bytes),
    );
    let eta = w.risk.as_ref().and_then(|r| r.eta_seconds);
    let thrashing = w.risk.as_ref().is_some_and(|r| r.thrashing);
    Row::new([
        Cell::from(w.pid.to_string()),
        Cell::from(escape(display_name(w)).into_owned()),
        Cell::from(escape(&w.runtime).into_owned()),
        Cell::from(model),
        Cell::from(weights.unwrap_or_else(|| Line::from("-"))),
        Cell::from(kv.unwrap_or_else(|| Line::from("-"))),
        Cell::from(anon),
        Cell::from(workload_vram(w).map_or_else(|| "-".to_owned(), |vram| vram.to_string())),
        Cell::from(Line::from(level(w.risk.as_ref()))),
        Cell::from(eta.map_or_else(|| "-".to_owned(), format_eta)),
        Cell::from(if thrashing {
            Span::styled("yes", alarm())
        } else {
            Span::raw("")
        }),
    ])
}

/// A bar of `part` out of `whole`, then `text`.
fn bar_cell((part, whole): (u64, u64), color: Color, text: String) -> Line<'static> {
    Line::from(vec![bar(part, whole, color), Span::raw(format!(" {text}"))])
}

/// [`bar_text`] in `color`.
fn bar(part: u64, whole: u64, color: Color) -> Span<'static> {
    Span::styled(bar_text(part, whole), Style::new().fg(color))
}

/// [`BAR_WIDTH`] cells, filled in proportion to `part / whole` to an eighth of a cell (empty
/// when `whole` is 0).
pub fn bar_text(part: u64, whole: u64) -> String {
    let eighths = if whole == 0 {
        0
    } else {
        let ratio = (part as f64 / whole as f64).clamp(0.0, 1.0);
        (ratio * (BAR_WIDTH * 8) as f64).round() as usize
    };
    let mut text: String = std::iter::repeat_n(BAR_FULL, eighths / 8).collect();
    let partial = BAR_EIGHTHS[eighths % 8];
    text.extend(partial);
    let drawn = eighths / 8 + usize::from(partial.is_some());
    text.extend(std::iter::repeat_n(BAR_EMPTY, BAR_WIDTH - drawn));
    text
}

/// `now/max` in bytes for people.
fn pair(now: u64, max: u64) -> String {
    format!("{}/{}", format_bytes(now), format_bytes(max))
}

fn render_events(frame: &mut Frame, area: Rect, data: &Data) {
    let [kills, actions] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(area);
    let kill_lines: Vec<Line> = data
        .oom_kills
        .iter()
        .rev()
        .map(|k| {
            Line::from(format!(
                "{} ago  pid {} {}  {}",
                format_eta(data.refreshed_unix - k.ts_unix),
                k.pid,
                escape(&k.comm),
                escape(&k.memcg)
            ))
        })
        .collect();
    let title = format!(" OOM kills ({}) ", data.oom_kills.len());
    frame.render_widget(
        Paragraph::new(or_none(kill_lines)).block(Block::bordered().title(title)),
        kills,
    );
    let (title, lines) = action_lines(data);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        actions,
    );
}

/// The actions pane's title and lines, newest first.
fn action_lines(data: &Data) -> (String, Vec<Line<'static>>) {
    match &data.actions {
        Actions::InForce(entries) => {
            let lines = entries
                .iter()
                .rev()
                .map(|a| {
                    let ago = format_eta(data.refreshed_unix - a.time);
                    Line::from(format!("{ago} ago  {}", escape(&a.description)))
                })
                .collect();
            (
                format!(" actions in force ({}) ", entries.len()),
                or_none(lines),
            )
        }
        Actions::NotVisible => (
            " actions ".to_owned(),
            vec![Line::from("actions: not visible to this user")],
        ),
        Actions::Unavailable(why) => (
            " actions ".to_owned(),
            vec![Line::from(format!("actions: {}", escape(why)))],
        ),
    }
}

/// `lines`, or a line saying `none`.
fn or_none(lines: Vec<Line<'static>>) -> Vec<Line<'static>> {
    if lines.is_empty() {
        vec![Line::from("none")]
    } else {
        lines
    }
}

fn render_inspect(frame: &mut Frame, area: Rect, inspect: &Inspect) {
    let title = format!(" inspect pid {} ({}) ", inspect.pid, escape(&inspect.name));
    let lines: Vec<Line> = match &inspect.body {
        InspectBody::Sampling => vec![Line::from(format!(
            "sampling pid {} for its report…",
            inspect.pid
        ))],
        InspectBody::Report(lines) => lines.iter().map(|l| Line::from(l.as_str())).collect(),
        InspectBody::Failed(why) => vec![Line::styled(format!("error: {}", escape(why)), alarm())],
    };
    let paragraph = Paragraph::new(lines)
        .block(Block::bordered().title(title))
        .wrap(Wrap { trim: false })
        .scroll((inspect.scroll, 0));
    frame.render_widget(paragraph, area);
}

/// The keys of the current view, and the last refresh's error.
fn key_line(model: &Model) -> Line<'static> {
    let keys = match model.view {
        View::Table => " q quit  ↑↓ select  s sort  r reverse  Enter inspect",
        View::Inspect(_) => " Esc back  ↑↓ PgUp PgDn scroll  q quit",
    };
    let mut spans = vec![Span::raw(keys)];
    if let Some(error) = &model.data.error {
        spans.push(Span::styled(
            format!("   error: {}", escape(error)),
            alarm(),
        ));
    }
    Line::from(spans)
}

/// A risk level, coloured: critical red, elevated yellow, ok green; `?` without one.
fn level(risk: Option<&proto::Assessment>) -> Span<'static> {
    let Some(risk) = risk else {
        return Span::raw("?");
    };
    let style = match risk.level.as_str() {
        "critical" => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        "elevated" => Style::new().fg(Color::Yellow),
        "ok" => Style::new().fg(Color::Green),
        _ => Style::new(),
    };
    Span::styled(escape(&risk.level).into_owned(), style)
}

fn alarm() -> Style {
    Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
}

/// The time of day of a Unix time, `HH:MM:SS UTC`.
fn clock(unix: f64) -> String {
    let s = unix.max(0.0) as u64 % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}
