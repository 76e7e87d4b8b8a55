//! The hooks' stop signal: set once when they are dropped, waited on between attempts and
//! while a command runs.

use std::{
    sync::{Condvar, Mutex, PoisonError},
    time::Duration,
};

/// Set once; waits wake when it is.
#[derive(Default)]
pub(super) struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    /// Stops: every wait returns, now and later.
    pub(super) fn set(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }

    /// Whether it is stopped.
    pub(super) fn is_set(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits `timeout`, or less when it stops; says whether it is stopped.
    pub(super) fn wait(&self, timeout: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        let (stopped, _) = self
            .wake
            .wait_timeout_while(stopped, timeout, |stopped| !*stopped)
            .unwrap_or_else(PoisonError::into_inner);
        *stopped
    }
}
