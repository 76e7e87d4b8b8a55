//! `cargo xtask install` and `cargo xtask check-service`: infermem as a systemd service, and
//! the same agent as a Kubernetes DaemonSet.
//!
//! - `install [--root DIR] [--release|--debug]` builds infermem and installs the binary, the
//!   unit and the default config under DIR (default `/`); see docs/service.md.
//! - `check-service` checks `systemd/infermem.service`: that no option hides what the agent
//!   watches or writes, `systemd-analyze verify`, and `systemd-analyze security --offline=yes`,
//!   whose overall exposure must not exceed [`MAX_EXPOSURE`]; then the DaemonSet manifest
//!   against the Kubernetes API schemas (kubernetes-validate, pinned, in a venv under
//!   `target/`) and its capabilities against the unit's.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::{
    cargo::{cargo, is_root, profile_dir, workspace_root},
    checks::{COMMAND_TIMEOUT, checked, output_within, pinned_venv, text, yaml_as_json},
};

/// The unit, the default config and the DaemonSet, in the repository.
const UNIT: &str = "systemd/infermem.service";
const CONFIG: &str = "systemd/config.toml";
const DAEMONSET: &str = "deploy/kubernetes/infermem-daemonset.yaml";
/// Where they are installed, below the root.
const INSTALLED_BINARY: &str = "usr/local/bin/infermem";
const INSTALLED_UNIT: &str = "etc/systemd/system/infermem.service";
const INSTALLED_CONFIG: &str = "etc/infermem/config.toml";
/// The unit's command line starts with the installed binary.
const EXEC_START: &str = "ExecStart=/usr/local/bin/infermem ";
/// Members of this group may use the API socket (the config's default `socket_group`).
const GROUP: &str = "infermem";

/// The highest overall exposure `systemd-analyze security` may give the unit. 3.1 is what
/// the unit scores with systemd 252 (Debian 12), so any loosening fails CI. What keeps it
/// above 0 is what the agent is for: root with eight capabilities (the probes, other users'
/// /proc, oom_score_adj, mlock, the socket's group), the host's network (OTLP, Prometheus,
/// model servers), /dev, the process tree and the cgroup tree left visible and writable.
/// A tightening should lower this number with it.
const MAX_EXPOSURE: f64 = 3.1;

/// kubernetes-validate (it bundles the Kubernetes OpenAPI schemas, 1.25 to 1.37: no
/// download at check time) and everything it imports, pinned.
const KUBERNETES_VALIDATE: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.4",
    "PyYAML==6.0.4",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing_extensions==4.16.0",
];
/// The manifest is checked against the oldest API it supports (1.30 brought
/// `securityContext.appArmorProfile`) and the newest that kubernetes-validate bundles.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// Options of `cargo xtask install`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    /// The root of the file system to install into.
    pub root: PathBuf,
    /// The release build (the default) or the debug one.
    pub release: bool,
}

impl InstallOptions {
    /// Parses `[--root DIR] [--release|--debug]`.
    pub fn parse(args: &[String]) -> Result<InstallOptions> {
        let mut options = InstallOptions {
            root: PathBuf::from("/"),
            release: true,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--root" => options.root = args.next().context("--root needs a directory")?.into(),
                "--release" => options.release = true,
                "--debug" => options.release = false,
                other => bail!("unknown install option {other:?}"),
            }
        }
        Ok(options)
    }
}

/// `cargo xtask install`: builds infermem, installs the binary, the unit and the default
/// config (never over an existing one), and on `/` the `infermem` group; prints what to run
/// next.
pub fn install(options: &InstallOptions) -> Result<()> {
    fs::create_dir_all(&options.root)
        .with_context(|| format!("creating {}", options.root.display()))?;
    let system = fs::canonicalize(&options.root)? == Path::new("/");
    ensure!(
        !system || is_root(),
        "installing into / needs root: sudo -E cargo xtask install (or --root DIR to stage)"
    );
    let mut build = vec!["build", "--package", "infermem", "--bins"];
    if options.release {
        build.push("--release");
    }
    cargo(&build, &[])?;
    let repo = workspace_root();
    let root = &options.root;
    let binary = profile_dir(options.release).join("infermem");
    place(&binary, &root.join(INSTALLED_BINARY), 0o755)?;
    place(&repo.join(UNIT), &root.join(INSTALLED_UNIT), 0o644)?;
    install_config(&repo.join(CONFIG), &root.join(INSTALLED_CONFIG))?;
    if system {
        ensure_group()?;
        println!("next: systemctl daemon-reload && systemctl enable --now infermem");
    } else {
        println!(
            "next, on the system installed into: groupadd --system {GROUP} (if missing), then \
             systemctl daemon-reload && systemctl enable --now infermem"
        );
    }
    Ok(())
}

/// Copies `from` to `to` with `mode`, through a temporary file renamed over `to`: a running
/// binary is replaced, not rewritten in place.
fn place(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let parent = to.parent().context("an install path has a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let temporary = to.with_extension("infermem-new");
    fs::copy(from, &temporary)
        .with_context(|| format!("copying {} to {}", from.display(), temporary.display()))?;
    fs::set_permissions(&temporary, fs::Permissions::from_mode(mode))?;
    fs::rename(&temporary, to).with_context(|| format!("installing {}", to.display()))?;
    println!("installed {}", to.display());
    Ok(())
}

/// Installs the default config unless a config is there already.
fn install_config(default: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        println!(
            "kept {}: an existing config is never overwritten (the default is {CONFIG})",
            to.display()
        );
        return Ok(());
    }
    // Root only: it may hold OTLP headers (tokens); no client reads it.
    place(default, to, 0o640)
}

/// Creates the `infermem` group when /etc/group has none (the agent reads /etc/group).
fn ensure_group() -> Result<()> {
    let groups = fs::read_to_string("/etc/group").context("reading /etc/group")?;
    if groups
        .lines()
        .any(|line| line.split(':').next() == Some(GROUP))
    {
        println!("group {GROUP} exists: its members may use the API socket");
        return Ok(());
    }
    checked(Command::new("groupadd").args(["--system", GROUP]))?;
    println!("created the system group {GROUP}: its members may use the API socket");
    Ok(())
}

/// `cargo xtask check-service`: the unit, then the DaemonSet.
pub fn check() -> Result<()> {
    let root = workspace_root();
    let unit = fs::read_to_string(root.join(UNIT)).with_context(|| format!("reading {UNIT}"))?;
    let problems = hiding_problems(&settings(&unit));
    ensure!(problems.is_empty(), "{UNIT}:\n  {}", problems.join("\n  "));
    println!("{UNIT}: nothing hides /proc, /sys/fs/cgroup or /dev/nvidia*");
    cargo(&["build", "--package", "infermem", "--bins"], &[])?;
    verify(&unit, &profile_dir(false).join("infermem"))?;
    let exposure = exposure(&root.join(UNIT))?;
    println!("{UNIT}: overall exposure {exposure:.1} (at most {MAX_EXPOSURE:.1})");
    ensure!(
        exposure <= MAX_EXPOSURE,
        "{UNIT} is exposed more than {MAX_EXPOSURE}: {exposure}"
    );
    check_daemonset(&root, &unit)
}

/// `systemd-analyze verify` of the unit, which must say nothing: an unknown or misspelt key
/// is only a warning (exit status 0). verify wants the ExecStart= binary to exist, and
/// `--root=` would want a whole systemd tree there (sysinit.target, /bin/kill), so a copy of
/// the unit whose ExecStart= names the binary just built is verified instead: the one line
/// that differs.
fn verify(unit: &str, binary: &Path) -> Result<()> {
    let built = format!("ExecStart={} ", binary.display());
    ensure!(
        unit.lines().filter(|l| l.starts_with(EXEC_START)).count() == 1,
        "{UNIT} has no single line starting with {EXEC_START:?}"
    );
    let copy: String = unit
        .lines()
        .map(|line| match line.strip_prefix(EXEC_START) {
            Some(rest) => format!("{built}{rest}\n"),
            None => format!("{line}\n"),
        })
        .collect();
    let dir = profile_dir(false).join("check-service");
    fs::create_dir_all(&dir)?;
    let path = dir.join("infermem.service");
    fs::write(&path, copy)?;
    let output = systemd_analyze(Command::new("systemd-analyze").arg("verify").arg(&path))?;
    let said = text(&output);
    ensure!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {UNIT} ({}, ExecStart= {}):\n{said}",
        output.status,
        binary.display()
    );
    println!("{UNIT}: systemd-analyze verify passes, without a warning");
    Ok(())
}

/// The overall exposure that `systemd-analyze security --offline=yes` gives `unit`.
fn exposure(unit: &Path) -> Result<f64> {
    let output = systemd_analyze(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(unit),
    )?;
    let said = text(&output);
    ensure!(
        output.status.success(),
        "systemd-analyze security {UNIT} failed ({}):\n{said}",
        output.status
    );
    overall_exposure(&said).with_context(|| format!("no overall exposure in:\n{said}"))
}

/// The number in `→ Overall exposure level for infermem.service: 3.1 OK 🙂`.
fn overall_exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for "))?;
    line.rsplit_once(": ")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs a `systemd-analyze` command; a missing one is an error that says where it comes from.
fn systemd_analyze(command: &mut Command) -> Result<Output> {
    output_within(command, COMMAND_TIMEOUT).map_err(|e| match e.downcast_ref::<std::io::Error>() {
        Some(io) if io.kind() == std::io::ErrorKind::NotFound => anyhow::anyhow!(
            "systemd-analyze is missing: install Debian's `systemd` package (apt-get install \
             systemd), which brings it; 252 or later (--offline=yes)"
        ),
        _ => e,
    })
}

/// A unit's `Key=value` assignments, in order (comments, blank lines and section headers
/// left out).
fn settings(unit: &str) -> Vec<(&str, &str)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with(['#', ';', '[']))
        .filter_map(|l| l.split_once('='))
        .map(|(key, value)| (key.trim(), value.trim()))
        .collect()
}

/// The value of the last assignment of `key` (systemd's rule for single-valued options).
fn last<'a>(settings: &[(&str, &'a str)], key: &str) -> Option<&'a str> {
    settings.iter().rev().find(|(k, _)| *k == key).map(|s| s.1)
}

/// Every value assigned to a list-valued `key`, whitespace-separated (an empty assignment
/// resets the list, as systemd does).
fn all<'a>(settings: &[(&str, &'a str)], key: &str) -> Vec<&'a str> {
    let mut values = Vec::new();
    for (_, value) in settings.iter().filter(|(k, _)| *k == key) {
        if value.is_empty() {
            values.clear();
        }
        values.extend(value.split_whitespace());
    }
    values
}

/// Whether a boolean option is set to true.
fn enabled(settings: &[(&str, &str)], key: &str) -> bool {
    last(settings, key).is_some_and(|v| !matches!(v, "no" | "false" | "off" | "0"))
}

/// What in the unit would hide what the agent reads, or make read-only what it writes:
/// /proc (every process, /proc/meminfo, /proc/pressure), /sys/fs/cgroup, /dev/nvidia*.
fn hiding_problems(settings: &[(&str, &str)]) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(value) = last(settings, "ProtectProc").filter(|v| *v != "default") {
        problems.push(format!("ProtectProc={value} hides processes in /proc"));
    }
    if last(settings, "ProcSubset") == Some("pid") {
        problems.push("ProcSubset=pid hides /proc/meminfo and /proc/pressure".into());
    }
    if enabled(settings, "ProtectControlGroups") {
        problems.push("ProtectControlGroups= makes /sys/fs/cgroup read-only".into());
    }
    let cgroup_writable = all(settings, "ReadWritePaths").contains(&"/sys/fs/cgroup");
    if enabled(settings, "ProtectKernelTunables") && !cgroup_writable {
        problems.push(
            "ProtectKernelTunables= makes /sys/fs/cgroup read-only without \
             ReadWritePaths=/sys/fs/cgroup"
                .into(),
        );
    }
    if enabled(settings, "PrivateDevices") {
        problems.push("PrivateDevices= hides /dev/nvidia*".into());
    }
    let acl = matches!(last(settings, "DevicePolicy"), Some("closed" | "strict"))
        || enabled(settings, "ProtectClock")
        || !all(settings, "DeviceAllow").is_empty();
    if acl && !all(settings, "DeviceAllow").contains(&"char-nvidia-frontend") {
        problems.push("a device list without char-nvidia-frontend blocks /dev/nvidia*".into());
    }
    problems
}

/// The capabilities of `CapabilityBoundingSet=`, without their `CAP_` prefix.
fn unit_capabilities(settings: &[(&str, &str)]) -> BTreeSet<String> {
    all(settings, "CapabilityBoundingSet")
        .into_iter()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect()
}

/// The manifest against the API schemas of each of [`KUBERNETES_VERSIONS`] (strict: an
/// unknown field fails), then its capabilities against the unit's.
fn check_daemonset(root: &Path, unit: &str) -> Result<()> {
    let bin = pinned_venv("service-venv", KUBERNETES_VALIDATE)?;
    let manifest = root.join(DAEMONSET);
    for version in KUBERNETES_VERSIONS {
        checked(
            Command::new(bin.join("kubernetes-validate"))
                .args(["--strict", "--kubernetes-version", version])
                .arg(&manifest),
        )?;
    }
    let documents: Vec<Value> =
        serde_json::from_value(yaml_as_json(&bin.join("python"), YAML_TO_JSON, &manifest)?)?;
    let wanted = unit_capabilities(&settings(unit));
    let problems = daemonset_problems(&documents, &wanted);
    ensure!(
        problems.is_empty(),
        "{DAEMONSET}:\n  {}",
        problems.join("\n  ")
    );
    println!(
        "{DAEMONSET}: valid for Kubernetes {}; the unit's capabilities, all others dropped",
        KUBERNETES_VERSIONS.join(" and ")
    );
    Ok(())
}

/// What is wrong with the DaemonSet's containers: capabilities other than the unit's, or
/// not every other one dropped.
fn daemonset_problems(documents: &[Value], wanted: &BTreeSet<String>) -> Vec<String> {
    let daemonsets: Vec<&Value> = documents
        .iter()
        .filter(|d| d["kind"] == "DaemonSet")
        .collect();
    if daemonsets.len() != 1 {
        return vec![format!("{} DaemonSets, not one", daemonsets.len())];
    }
    let containers = daemonsets[0]["spec"]["template"]["spec"]["containers"].as_array();
    let mut problems = Vec::new();
    for container in containers.into_iter().flatten() {
        let name = container["name"].as_str().unwrap_or("(unnamed)");
        let capabilities = &container["securityContext"]["capabilities"];
        let strings = |list: &Value| -> BTreeSet<String> {
            let list = list.as_array().into_iter().flatten();
            list.filter_map(Value::as_str).map(str::to_owned).collect()
        };
        let added = strings(&capabilities["add"]);
        if &added != wanted {
            problems.push(format!(
                "container {name}: adds {added:?}, the unit bounds to {wanted:?}"
            ));
        }
        if strings(&capabilities["drop"]) != BTreeSet::from(["ALL".to_owned()]) {
            problems.push(format!("container {name}: does not drop ALL"));
        }
    }
    problems
}

/// Reads every YAML document of a file as JSON, with PyYAML (which kubernetes-validate
/// itself parses manifests with).
const YAML_TO_JSON: &str = "import json, sys, yaml\n\
     json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)";

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SHIPPED: &str = include_str!("../../systemd/infermem.service");

    #[test]
    fn the_shipped_unit_hides_nothing_the_agent_needs() {
        assert_eq!(hiding_problems(&settings(SHIPPED)), Vec::<String>::new());
    }

    /// Each option that would hide /proc, /sys/fs/cgroup or /dev/nvidia*, added to the
    /// shipped unit (a later assignment wins, as in systemd), is caught.
    #[test]
    fn options_that_hide_what_the_agent_needs_are_caught() {
        let variants = [
            "ProtectProc=invisible",
            "ProcSubset=pid",
            "ProtectControlGroups=yes",
            "ReadWritePaths=",
            "PrivateDevices=true",
            "DeviceAllow=",
        ];
        for variant in variants {
            let unit = format!("{SHIPPED}\n[Service]\n{variant}\n");
            let problems = hiding_problems(&settings(&unit));
            assert_eq!(problems.len(), 1, "{variant}: {problems:?}");
        }
        let without_acl = "[Service]\nProtectKernelTunables=no\nDevicePolicy=auto\n";
        assert_eq!(
            hiding_problems(&settings(without_acl)),
            Vec::<String>::new()
        );
        let clock_only = "[Service]\nProtectClock=yes\n";
        assert_eq!(hiding_problems(&settings(clock_only)).len(), 1);
    }

    #[test]
    fn capabilities_are_read_without_their_prefix() {
        let unit = "[Service]\nCapabilityBoundingSet=CAP_A\n# CapabilityBoundingSet=CAP_X\n\
                    CapabilityBoundingSet=CAP_B CAP_C\n";
        let expected: BTreeSet<String> = ["A", "B", "C"].map(String::from).into();
        assert_eq!(unit_capabilities(&settings(unit)), expected);
        let reset = format!("{unit}CapabilityBoundingSet=\nCapabilityBoundingSet=CAP_D\n");
        assert_eq!(
            unit_capabilities(&settings(&reset)),
            ["D".to_owned()].into()
        );
        assert!(unit_capabilities(&settings(SHIPPED)).contains("BPF"));
    }

    #[test]
    fn the_overall_exposure_is_parsed() {
        let report = "✓ UMask=   Files created by service are accessible only by ...\n\n\
                      → Overall exposure level for infermem.service: 3.1 OK 🙂\n";
        assert_eq!(overall_exposure(report), Some(3.1));
        assert_eq!(overall_exposure("no summary"), None);
    }

    fn daemonset(add: Value, drop: Value) -> Vec<Value> {
        let container = json!({"name": "infermem", "securityContext": {
            "capabilities": {"add": add, "drop": drop}}});
        vec![
            json!({"kind": "Namespace"}),
            json!({"kind": "DaemonSet", "spec": {"template": {"spec": {
                "containers": [container]}}}}),
        ]
    }

    #[test]
    fn daemonset_capabilities_must_be_the_units() {
        let wanted: BTreeSet<String> = ["BPF", "PERFMON"].map(String::from).into();
        let ok = daemonset(json!(["PERFMON", "BPF"]), json!(["ALL"]));
        assert_eq!(daemonset_problems(&ok, &wanted), Vec::<String>::new());
        let more = daemonset(json!(["BPF", "PERFMON", "SYS_ADMIN"]), json!(["ALL"]));
        assert_eq!(daemonset_problems(&more, &wanted).len(), 1);
        let kept = daemonset(json!(["BPF", "PERFMON"]), json!(["NET_RAW"]));
        assert_eq!(daemonset_problems(&kept, &wanted).len(), 1);
        assert_eq!(daemonset_problems(&ok[..1], &wanted).len(), 1);
    }

    #[test]
    fn install_options_parse() {
        let parse = |args: &[&str]| {
            InstallOptions::parse(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(
            parse(&[]).unwrap(),
            InstallOptions {
                root: "/".into(),
                release: true
            }
        );
        let staged = parse(&["--root", "/tmp/stage", "--debug"]).unwrap();
        assert_eq!(staged.root, Path::new("/tmp/stage"));
        assert!(!staged.release);
        assert!(parse(&["--root"]).is_err());
        assert!(parse(&["--prefix", "/usr"]).is_err());
    }
}
