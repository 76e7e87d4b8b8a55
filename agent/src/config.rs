//! The agent's configuration: TOML at `/etc/infermem/config.toml` (or `infermem run
//! --config FILE`). Every key is optional and has a default; `systemd/config.toml` lists them
//! all with their defaults and what they do. An unknown key, a wrong type or a bad value is an
//! error that names the file, the line and the key.

use std::{
    fmt,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de::Error as _};

use crate::{predict, probes::ProbeOptions, units};

/// Where the config is read from unless `--config` names a file.
pub const DEFAULT_PATH: &str = "/etc/infermem/config.toml";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub api: ApiConfig,
    pub probes: ProbesConfig,
    pub collect: CollectConfig,
    /// `[predictor]`: the thresholds of `docs/predictor.md`, as [`predict::Config`] names them.
    pub predictor: predict::Config,
    /// `[policy]`: what to protect and how, and whether to act (`docs/policy.md`).
    pub policy: crate::policy::PolicyConfig,
    /// `[hooks]`: alert commands and webhooks.
    pub hooks: crate::act::hooks::HooksConfig,
    /// `[export]`: the Prometheus endpoint and OpenTelemetry (`docs/metrics.md`).
    pub export: crate::export::ExportConfig,
    /// `[gpu]`: the NVIDIA driver version to decode ioctls with, and NVML (`docs/gpu.md`).
    pub gpu: crate::gpu::GpuConfig,
}

/// `[api]`: the local socket and who may see what.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub socket: PathBuf,
    /// Octal permission bits of the socket.
    pub socket_mode: Mode,
    /// Group owning the socket: its members may connect. Default: `infermem` when that group
    /// exists, else none (root only).
    pub socket_group: Option<String>,
    /// Members of this group see every process; others see only their own. Default: none
    /// (root only).
    pub admin_group: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: PathBuf::from(crate::api::DEFAULT_SOCKET),
            socket_mode: Mode(0o660),
            socket_group: group_id("infermem").map(|_| "infermem".to_owned()),
            admin_group: None,
        }
    }
}

/// `[probes]`: which kernel BTF, and which file mappings get fault buckets.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    pub btf: PathBuf,
    /// File mappings from this size up get fault buckets (and make a process a model
    /// candidate).
    pub model_mapping_min: Bytes,
    /// The most 2 MiB buckets one process may own.
    pub buckets_per_process: u64,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        let policy = infermem_common::BucketPolicy::HOST;
        ProbesConfig {
            btf: PathBuf::from(crate::probes::DEFAULT_BTF_PATH),
            model_mapping_min: Bytes(policy.min_mapping_bytes),
            buckets_per_process: policy.max_per_process,
        }
    }
}

/// `[collect]`: how often the collectors read what.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectConfig {
    /// The sampling tick: host, cgroups, and the predictor's evaluation.
    pub interval: Interval,
    /// `smaps_rollup` of model (and watched) processes.
    pub model_process_interval: Interval,
    /// `smaps_rollup` of other processes (it takes their mmap lock).
    pub idle_process_interval: Interval,
    /// The most processes tracked.
    pub max_processes: usize,
}

impl Default for CollectConfig {
    fn default() -> Self {
        CollectConfig {
            interval: Interval(Duration::from_secs(1)),
            model_process_interval: Interval(Duration::from_secs(1)),
            idle_process_interval: Interval(Duration::from_secs(30)),
            max_processes: 65_536,
        }
    }
}

impl ProbesConfig {
    /// The probes' options.
    pub fn probe_options(&self) -> ProbeOptions {
        ProbeOptions {
            btf_path: self.btf.clone(),
            buckets: infermem_common::BucketPolicy {
                min_mapping_bytes: self.model_mapping_min.0,
                max_per_process: self.buckets_per_process,
            },
        }
    }
}

/// A byte size: an integer, or a string such as `"64MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) => u64::try_from(n).map(Bytes).map_err(D::Error::custom),
            NumberOrText::Text(t) => units::parse_bytes(&t).map(Bytes).map_err(D::Error::custom),
        }
    }
}

/// A positive duration: a string such as `"500ms"`, `"2s"`, `"1m"`, or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval(pub Duration);

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) => n.to_string(),
            NumberOrText::Text(t) => t,
        };
        units::parse_duration(&text)
            .map(Interval)
            .map_err(D::Error::custom)
    }
}

/// Socket permission bits: a string of octal digits (`"0660"`) or an integer (`0o660`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mode = match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) => u32::try_from(n).map_err(D::Error::custom)?,
            NumberOrText::Text(t) => u32::from_str_radix(t.trim(), 8)
                .map_err(|_| D::Error::custom(format!("{t:?} is not octal, e.g. \"0660\"")))?,
        };
        if mode > 0o777 {
            return Err(D::Error::custom(format!(
                "{mode:o} is not a permission mode"
            )));
        }
        Ok(Mode(mode))
    }
}

/// A value written as an integer or as a string.
enum NumberOrText {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for NumberOrText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = NumberOrText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<NumberOrText, E> {
                Ok(NumberOrText::Number(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<NumberOrText, E> {
                i64::try_from(v)
                    .map(NumberOrText::Number)
                    .map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NumberOrText, E> {
                Ok(NumberOrText::Text(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Why the config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", .path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl AgentConfig {
    /// The groups' ids: `(socket group, admin group)`; an unknown group name is an error.
    pub fn group_ids(&self) -> Result<(Option<u32>, Option<u32>), String> {
        let resolve = |name: &Option<String>, key: &str| match name {
            None => Ok(None),
            Some(name) => group_id(name)
                .map(Some)
                .ok_or_else(|| format!("[api] {key}: no group named {name:?} in /etc/group")),
        };
        Ok((
            resolve(&self.api.socket_group, "socket_group")?,
            resolve(&self.api.admin_group, "admin_group")?,
        ))
    }
}

/// Reads the config at `path`, or at [`DEFAULT_PATH`] (all defaults when it does not exist).
pub fn load(path: Option<&Path>) -> Result<(AgentConfig, PathBuf), ConfigError> {
    let (path, explicit) = match path {
        Some(path) => (path.to_owned(), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((parse(&text, &path)?, path)),
        Err(err) if !explicit && err.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!("no {DEFAULT_PATH}: every setting at its default");
            Ok((AgentConfig::default(), path))
        }
        Err(source) => Err(ConfigError::Read { path, source }),
    }
}

/// Parses and checks a config's text; `origin` names it in errors.
pub fn parse(text: &str, origin: &Path) -> Result<AgentConfig, ConfigError> {
    let invalid = |span: Option<Range<usize>>, message: String| {
        let (line, column) = span.map_or((1, 1), |s| line_column(text, s.start));
        ConfigError::Invalid {
            path: origin.to_owned(),
            line,
            column,
            message,
        }
    };
    let config: AgentConfig = toml::from_str(text).map_err(|e| {
        let message = describe(text, e.span(), e.message());
        invalid(e.span(), message)
    })?;
    if let Some((key, why)) = config.predictor.check() {
        return Err(invalid(
            key_span(text, key),
            format!("[predictor] {key} {why}"),
        ));
    }
    if let Err(why) = config.hooks.check() {
        return Err(invalid(key_span(text, "[hooks]"), format!("[hooks] {why}")));
    }
    let collect = &config.collect;
    if collect.max_processes == 0 {
        let span = key_span(text, "max_processes");
        return Err(invalid(
            span,
            "[collect] max_processes must be at least 1".into(),
        ));
    }
    Ok(config)
}

/// A parse error for people: an unknown key with its section and the keys it could be, a bad
/// value with its section and key.
fn describe(text: &str, span: Option<Range<usize>>, message: &str) -> String {
    let Some(span) = span else {
        return message.to_owned();
    };
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let on_header = line.starts_with('[');
    // The table the error is in: the last `[header]` above it.
    let section = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((key, expected)) = rest.split_once('`')
    {
        let expected: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let expected = expected.join(", ");
        return match section.filter(|_| !on_header) {
            Some(section) => {
                format!("unknown key \"{key}\" in [{section}] (expected one of: {expected})")
            }
            None => format!("unknown section [{key}] (expected one of: {expected})"),
        };
    }
    // A value error: name the key written before `=` on the error's line.
    match (section, line.split_once('=')) {
        (Some(section), Some((key, _))) if !on_header && start > line_start + key.len() => {
            format!("[{section}] {}: {message}", key.trim())
        }
        _ => message.to_owned(),
    }
}

/// The 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Where `key = …` is written, for errors found after parsing.
fn key_span(text: &str, key: &str) -> Option<Range<usize>> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            let start = offset + (line.len() - trimmed.len());
            return Some(start..start + key.len());
        }
        offset += line.len();
    }
    None
}

/// The id of a group in `/etc/group`.
pub fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then(|| fields.nth(1)?.parse().ok())?
    })
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<AgentConfig, ConfigError> {
        parse(text, Path::new("test.toml"))
    }

    #[test]
    fn an_empty_file_is_every_default() {
        assert_eq!(parse_text("").unwrap(), AgentConfig::default());
        let defaults = AgentConfig::default();
        assert_eq!(defaults.predictor, predict::Config::default());
        assert_eq!(defaults.collect.interval.0, Duration::from_secs(1));
        assert_eq!(defaults.api.socket_mode, Mode(0o660));
    }

    #[test]
    fn the_shipped_config_is_the_defaults() {
        let text = include_str!("../../systemd/config.toml");
        assert_eq!(parse_text(text).unwrap(), AgentConfig::default());
    }

    #[test]
    fn every_section_parses() {
        let config = parse_text(
            "[api]\nsocket = \"/tmp/x.sock\"\nsocket_mode = \"0600\"\nadmin_group = \"wheel\"\n\
             [probes]\nmodel_mapping_min = \"128MiB\"\nbuckets_per_process = 1024\n\
             [collect]\ninterval = \"500ms\"\nidle_process_interval = 60\n\
             [predictor]\ncritical_eta_s = 30.0\nconfirm_critical = 3\n",
        )
        .unwrap();
        assert_eq!(config.api.socket_mode, Mode(0o600));
        assert_eq!(
            config.probes.probe_options().buckets.min_mapping_bytes,
            128 << 20
        );
        assert_eq!(config.collect.interval.0, Duration::from_millis(500));
        assert_eq!(
            config.collect.idle_process_interval.0,
            Duration::from_secs(60)
        );
        assert_eq!(config.predictor.critical_eta_s, 30.0);
        assert_eq!(config.predictor.confirm_critical, 3);
    }

    #[test]
    fn an_unknown_key_names_its_line() {
        let err = parse_text("[api]\nsocket = \"/x\"\nsockt = \"/y\"\n").unwrap_err();
        let text = err.to_string();
        assert_eq!(
            text,
            "test.toml:3:1: unknown key \"sockt\" in [api] (expected one of: socket, \
             socket_mode, socket_group, admin_group)"
        );
        let err = parse_text("[api]\n\n[apii]\nsocket = \"/x\"\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("test.toml:3:2: unknown section [apii] (expected one of: api,"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_value_names_its_line() {
        let err = parse_text("\n[collect]\ninterval = \"soon\"\n").unwrap_err();
        assert!(err.to_string().starts_with("test.toml:3:"), "{err}");
        assert!(err.to_string().contains("[collect] interval: "), "{err}");
        let err = parse_text("[probes]\nbuckets_per_process = \"many\"\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("test.toml:2:23: [probes] buckets_per_process: invalid type"),
            "{err}"
        );
        let err = parse_text("[predictor]\n\nwindow_s = true\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("test.toml:3:12: [predictor] window_s: invalid type: boolean"),
            "{err}"
        );
        let err = parse_text("[collect]\n\ninterval = true\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "test.toml:3:12: [collect] interval: invalid type: boolean `true`, expected an \
             integer or a string"
        );
        let err = parse_text("[api]\nsocket_mode = \"0999\"\n").unwrap_err();
        assert!(err.to_string().starts_with("test.toml:2:"), "{err}");
    }

    #[test]
    fn a_value_that_breaks_a_rule_names_its_line() {
        let err =
            parse_text("[predictor]\nmin_samples = 5\ncritical_headroom = 2.0\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("test.toml:3:"), "{text}");
        assert!(text.contains("critical_headroom"), "{text}");
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        assert!(load(Some(Path::new("/nonexistent/infermem.toml"))).is_err());
    }
}
