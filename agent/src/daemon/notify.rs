//! systemd's notification protocol (`Type=notify`, `WatchdogSec=`), through the sd-notify
//! crate. Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing; a failed
//! notification is logged, never fatal.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd how the agent is doing.
#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// A notifier for the service manager that started us, if one asked for notifications.
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
        }
    }

    /// The agent serves its API.
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// A reload (SIGHUP) begins; systemd ≥ 253 wants the monotonic time with it.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// The agent is shutting down.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// A one-line status for `systemctl status`.
    pub fn status(&self, text: &str) {
        self.send(&[NotifyState::Status(text)]);
    }

    /// How often to ping the watchdog: half of `WatchdogSec=`, when it is set for us.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.enabled
            .then(sd_notify::watchdog_enabled)
            .flatten()
            .map(|timeout| timeout / 2)
    }

    /// The agent is alive and working.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    fn send(&self, states: &[NotifyState]) {
        if self.enabled
            && let Err(err) = sd_notify::notify(states)
        {
            tracing::warn!("cannot notify systemd: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("infermem-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // SAFETY: this is the only test that touches NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        let notifier = Notifier::from_env();
        notifier.ready();
        notifier.status("watching 3 models");
        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buffer = [0u8; 256];
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = socket.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"READY=1\n");
        let n = socket.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"STATUS=watching 3 models\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
