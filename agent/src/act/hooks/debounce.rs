//! Debouncing: the same kind of event for the same target at most once per window.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// The most (kind, key) pairs remembered; beyond, those outside the window are forgotten,
/// then the oldest.
const MAX_TRACKED: usize = 4096;

/// When each (kind, key) was last let through, and how many were held back since.
pub(super) struct Debounce {
    window: Duration,
    last: HashMap<(String, String), Slot>,
}

struct Slot {
    admitted: Instant,
    suppressed: u64,
}

impl Debounce {
    pub(super) fn new(window: Duration) -> Debounce {
        Debounce {
            window,
            last: HashMap::new(),
        }
    }

    /// Whether an event of `kind` for `key` fired `at` goes out: `Some(n)`, with `n` the
    /// events of the same kind and key suppressed since the last one that went out, or
    /// `None` (suppressed) when that one went out less than the window before.
    pub(super) fn admit(&mut self, kind: &str, key: &str, at: Instant) -> Option<u64> {
        let id = (kind.to_owned(), key.to_owned());
        if let Some(slot) = self.last.get_mut(&id) {
            if at.saturating_duration_since(slot.admitted) < self.window {
                slot.suppressed += 1;
                return None;
            }
            let suppressed = slot.suppressed;
            *slot = Slot {
                admitted: at,
                suppressed: 0,
            };
            return Some(suppressed);
        }
        self.make_room(at);
        let slot = Slot {
            admitted: at,
            suppressed: 0,
        };
        self.last.insert(id, slot);
        Some(0)
    }

    /// Keeps the map under [`MAX_TRACKED`]: forgets pairs whose window is over, then the
    /// oldest. Their suppressed counts are then not reported (the stats have them).
    fn make_room(&mut self, now: Instant) {
        if self.last.len() < MAX_TRACKED {
            return;
        }
        let window = self.window;
        self.last
            .retain(|_, slot| now.saturating_duration_since(slot.admitted) < window);
        if self.last.len() < MAX_TRACKED {
            return;
        }
        let oldest = self
            .last
            .iter()
            .min_by_key(|(_, slot)| slot.admitted)
            .map(|(id, _)| id.clone());
        if let Some(oldest) = oldest {
            self.last.remove(&oldest);
        }
    }
}
