//! The keys of `infermem top`: what each does to the [`Model`], and what the command must do
//! next ([`Effect`]).

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::model::{Model, View};

/// Rows (or lines) a page key moves.
const PAGE: isize = 10;

/// What the command does after a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing but a redraw.
    None,
    /// Restore the terminal and exit.
    Quit,
    /// Fetch the inspect report of this pid (its pane is open, sampling).
    Inspect(u32),
}

/// Applies `key` to `model`.
///
/// Everywhere: `q` and Ctrl-C quit. In the table: Esc quits, ↑/↓ (k/j), PgUp/PgDn,
/// Home/End select, `s` cycles the sort, `r` reverses it, Enter inspects the selected
/// process. In the inspect pane: the same keys scroll, Esc (or Backspace) goes back.
pub fn handle_key(model: &mut Model, key: KeyEvent) -> Effect {
    if key.kind == KeyEventKind::Release {
        return Effect::None;
    }
    let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
    if ctrl_c || key.code == KeyCode::Char('q') {
        return Effect::Quit;
    }
    if matches!(model.view, View::Inspect(_)) {
        inspect_key(model, key.code);
        return Effect::None;
    }
    match key.code {
        KeyCode::Esc => return Effect::Quit,
        KeyCode::Enter => return model.open_inspect().map_or(Effect::None, Effect::Inspect),
        KeyCode::Char('s') => model.sort = model.sort.next(),
        KeyCode::Char('r') => model.reversed = !model.reversed,
        code => {
            if let Some(delta) = movement(code) {
                model.move_selection(delta);
            }
        }
    }
    Effect::None
}

/// A key of the inspect pane: scroll, or back to the table.
fn inspect_key(model: &mut Model, code: KeyCode) {
    if matches!(code, KeyCode::Esc | KeyCode::Backspace) {
        model.view = View::Table;
        return;
    }
    if let (View::Inspect(inspect), Some(delta)) = (&mut model.view, movement(code)) {
        let last = inspect.body.line_count().saturating_sub(1);
        let to = usize::from(inspect.scroll)
            .saturating_add_signed(delta)
            .min(last);
        inspect.scroll = u16::try_from(to).unwrap_or(u16::MAX);
    }
}

/// How many rows a movement key moves: ↑/↓, k/j, PgUp/PgDn, Home/End.
fn movement(code: KeyCode) -> Option<isize> {
    match code {
        KeyCode::Up | KeyCode::Char('k') => Some(-1),
        KeyCode::Down | KeyCode::Char('j') => Some(1),
        KeyCode::PageUp => Some(-PAGE),
        KeyCode::PageDown => Some(PAGE),
        KeyCode::Home => Some(isize::MIN),
        KeyCode::End => Some(isize::MAX),
        _ => None,
    }
}
