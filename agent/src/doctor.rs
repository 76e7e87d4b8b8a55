//! `infermem doctor`: one pass/fail line per kernel feature infermem needs or can use.

use std::{fs, path::Path};

use infermem_common::Probe;
use serde::Serialize;

use crate::{
    collect::cgroup::{CgroupLayout, CgroupVersion},
    probes::{self, ProbeError, ProbeOptions, Probes, offsets},
    units::format_bytes,
};

/// The oldest kernel the probes support: tracing programs may use non-preallocated hash maps
/// (which keep idle memory small) only since Linux 6.1.
const MIN_KERNEL: (u32, u32) = (6, 1);

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    /// Whether infermem needs it (a failure makes `doctor` exit non-zero) or only can use it.
    pub required: bool,
    pub detail: String,
}

impl Check {
    fn new(name: impl Into<String>, required: bool, outcome: Result<String, String>) -> Self {
        let (pass, detail) = match outcome {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        Check {
            name: name.into(),
            pass,
            required,
            detail,
        }
    }
}

/// Runs every check. Loading the probes is one of them, so this needs the same privileges as
/// `inspect` to pass everything.
pub fn run(options: &ProbeOptions, agent: Option<&AgentProbes>) -> Vec<Check> {
    let mut checks = vec![
        Check::new("kernel version", true, kernel_version()),
        Check::new("privileges for eBPF", true, privileges()),
        Check::new("bpf() syscall", true, bpf_syscall()),
    ];
    let btf = btf_rs::Btf::from_file(&options.btf_path);
    checks.push(Check::new(
        "BTF",
        true,
        match &btf {
            Ok(btf) => {
                let missing = offsets::missing_fields(&offsets::resolve(btf));
                if missing.is_empty() {
                    Ok(format!(
                        "{} (all kernel fields resolved)",
                        options.btf_path.display()
                    ))
                } else {
                    Err(format!(
                        "{} lacks fields the OOM, exec and exit probes read: {}",
                        options.btf_path.display(),
                        missing.join(", ")
                    ))
                }
            }
            Err(err) => Err(format!(
                "{}: {err} (needs CONFIG_DEBUG_INFO_BTF=y)",
                options.btf_path.display()
            )),
        },
    ));
    checks.push(Check::new("tracefs", false, tracefs()));
    // A running agent owns the probes: ask it instead of attaching a second copy.
    let loaded = match agent {
        Some(_) => Err(ProbeError::NoneAttached(
            "owned by the running agent".to_owned(),
        )),
        None => Probes::load(options),
    };
    checks.push(Check::new(
        "probes load and attach",
        true,
        match agent {
            Some(agent) => agent.summary(),
            None => loaded
                .as_ref()
                .map(|p| {
                    let attached = Probe::ALL.len() - p.unavailable().len();
                    format!(
                        "{attached} of {} probes verified and attached",
                        Probe::ALL.len()
                    )
                })
                .map_err(|e| e.to_string()),
        },
    ));
    for probe in Probe::ALL {
        let outcome = match (&btf, agent) {
            (Ok(btf), Some(agent)) => agent.probe_check(btf, probe),
            (Ok(btf), None) => probe_check(btf, loaded.as_ref().ok(), probe),
            (Err(_), _) => Err("unknown (no BTF)".to_owned()),
        };
        checks.push(Check::new(
            format!("probe {}", probe.tracepoint()),
            false,
            outcome,
        ));
    }
    checks.push(Check::new("memory cgroup", true, memory_cgroup()));
    checks.push(Check::new("PSI (memory pressure)", false, psi()));
    checks.push(Check::new("NVIDIA devices", false, nvidia()));
    checks.push(Check::new("mlock (pin model pages)", false, mlock()));
    checks
}

/// Renders checks as aligned text lines.
pub fn render(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    checks
        .iter()
        .map(|c| {
            let status = match (c.pass, c.required) {
                (true, _) => "pass",
                (false, true) => "FAIL",
                (false, false) => "fail (optional)",
            };
            format!("{status:<15}  {:<width$}  {}\n", c.name, c.detail)
        })
        .collect()
}

fn kernel_version() -> Result<String, String> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("cannot read /proc/sys/kernel/osrelease: {e}"))?;
    let release = release.trim();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version >= MIN_KERNEL {
        Ok(format!("Linux {release}"))
    } else {
        Err(format!(
            "Linux {release}; infermem needs {}.{} or newer",
            MIN_KERNEL.0, MIN_KERNEL.1
        ))
    }
}

fn privileges() -> Result<String, String> {
    probes::check_privileges()
        .map(|()| {
            // SAFETY: geteuid has no preconditions.
            match unsafe { libc::geteuid() } {
                0 => "root".to_owned(),
                uid => format!("uid {uid} with CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN"),
            }
        })
        .map_err(|e| e.to_string())
}

/// Creates (and closes) a one-entry BPF array map: proves the syscall exists and we may use it.
fn bpf_syscall() -> Result<String, String> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
    };
    // SAFETY: a valid bpf_attr prefix for BPF_MAP_CREATE; the kernel zero-extends the rest.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            size_of::<MapCreate>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::ENOSYS) => "the kernel has no bpf() (CONFIG_BPF_SYSCALL)".to_owned(),
            Some(libc::EPERM) => "bpf() refused: not permitted".to_owned(),
            _ => format!("bpf(BPF_MAP_CREATE) failed: {err}"),
        });
    }
    // SAFETY: closing the fd we just got.
    unsafe { libc::close(fd as libc::c_int) };
    Ok("BPF_MAP_CREATE works".to_owned())
}

fn tracefs() -> Result<String, String> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    match mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("tracefs"))
    {
        Some(line) => Ok(format!(
            "mounted at {} (infermem does not need it)",
            line.split_whitespace().nth(1).unwrap_or("?")
        )),
        None => Err("not mounted; infermem does not need it (its probes attach by BTF)".into()),
    }
}

/// Whether `probe` runs on this kernel, and if not, which features are off.
/// The probes of the running agent, as its API reports them.
#[derive(Debug, Clone)]
pub struct AgentProbes {
    pub pid: u32,
    /// Why eBPF is off in the agent; None when its probes are loaded.
    pub off: Option<String>,
    /// `<tracepoint>: <why>` for each probe that did not attach.
    pub unavailable: Vec<String>,
}

impl AgentProbes {
    fn summary(&self) -> Result<String, String> {
        match &self.off {
            None => Ok(format!(
                "{} of {} probes attached by the running agent (pid {}); not loaded again",
                Probe::ALL.len() - self.unavailable.len(),
                Probe::ALL.len(),
                self.pid
            )),
            Some(why) => Err(format!(
                "the running agent (pid {}) has none: {why}",
                self.pid
            )),
        }
    }

    fn probe_check(&self, btf: &btf_rs::Btf, probe: Probe) -> Result<String, String> {
        in_btf(btf, probe)?;
        let prefix = format!("{}: ", probe.tracepoint());
        if let Some(why) = self
            .unavailable
            .iter()
            .find_map(|u| u.strip_prefix(&prefix))
        {
            return Err(format!("{why}; off: {}", probes::lost_features(probe)));
        }
        self.summary()?;
        Ok(format!(
            "attached to raw tracepoint {} by the running agent",
            probe.tracepoint()
        ))
    }
}

/// Whether the kernel's BTF has the probe's tracepoint.
fn in_btf(btf: &btf_rs::Btf, probe: Probe) -> Result<(), String> {
    let typedef = format!("btf_trace_{}", probe.tracepoint());
    if btf
        .resolve_ids_by_name(&typedef)
        .is_ok_and(|ids| !ids.is_empty())
    {
        Ok(())
    } else {
        Err(format!(
            "no {typedef} in the kernel's BTF; off: {}",
            probes::lost_features(probe)
        ))
    }
}

fn probe_check(btf: &btf_rs::Btf, loaded: Option<&Probes>, probe: Probe) -> Result<String, String> {
    let name = probe.tracepoint();
    let lost = probes::lost_features(probe);
    in_btf(btf, probe)?;
    let Some(loaded) = loaded else {
        return Err(format!(
            "raw tracepoint {name} is in the kernel's BTF, but the probes did not load"
        ));
    };
    if let Some((_, reason)) = loaded.unavailable().iter().find(|(p, _)| *p == probe) {
        return Err(format!("{reason}; off: {lost}"));
    }
    let form = match (probe, loaded.mark_victim()) {
        (Probe::OomVictim, Some(form)) => format!(" ({} form)", form.prototype()),
        _ => String::new(),
    };
    Ok(format!("attached to raw tracepoint {name}{form}"))
}

fn memory_cgroup() -> Result<String, String> {
    let layout = CgroupLayout::detect();
    let hybrid = layout.v1_memory.is_some() && layout.v2.is_some();
    match layout.memory_hierarchy() {
        Some((CgroupVersion::V1, mount)) => Ok(format!(
            "cgroup v1 memory controller at {}{}",
            mount.display(),
            if hybrid { " (hybrid layout)" } else { "" }
        )),
        Some((CgroupVersion::V2, mount)) => Ok(format!(
            "cgroup v2 with the memory controller at {}",
            mount.display()
        )),
        None => Err(match layout.v2 {
            Some(v2) => format!(
                "cgroup v2 at {} without the memory controller",
                v2.display()
            ),
            None => "no memory cgroup hierarchy is mounted".to_owned(),
        }),
    }
}

fn psi() -> Result<String, String> {
    let path = Path::new("/proc/pressure/memory");
    match fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().next().unwrap_or_default().trim().to_string()),
        Err(e) => Err(format!(
            "{}: {e} (needs CONFIG_PSI and psi=1)",
            path.display()
        )),
    }
}

fn nvidia() -> Result<String, String> {
    use crate::gpu::{self, state::Driver};
    let driver = match Driver::detect(&gpu::GpuConfig::default()) {
        Driver::Absent => {
            return Err(
                "no NVIDIA driver loaded (no /sys/module/nvidia/version): GPU memory is not tracked"
                    .into(),
            );
        }
        Driver::Unknown { version, why } => {
            format!("driver {version}: RM ioctls not decoded ({why})")
        }
        Driver::Decoding { version, layout } => {
            format!(
                "driver {version}: RM ioctls decoded with layout {}",
                layout.name
            )
        }
    };
    let nvml = match gpu::nvml::Nvml::open().and_then(|n| n.snapshot()) {
        Ok(snapshot) => {
            let names: Vec<String> = snapshot
                .devices
                .iter()
                .map(|d| format!("{} ({})", d.name, format_bytes(d.total_bytes)))
                .collect();
            format!("NVML: {} GPU(s): {}", names.len(), names.join(", "))
        }
        Err(e) => format!("NVML unavailable: {e}"),
    };
    Ok(format!("{driver}; {nvml}"))
}

fn mlock() -> Result<String, String> {
    const CAP_IPC_LOCK: u32 = 14;
    let caps = probes::effective_capabilities().unwrap_or(0);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    let fmt = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            "unlimited".to_owned()
        } else {
            format_bytes(v)
        }
    };
    let rlimit = format!(
        "RLIMIT_MEMLOCK {} (hard {})",
        fmt(limit.rlim_cur),
        fmt(limit.rlim_max)
    );
    if caps & (1 << CAP_IPC_LOCK) != 0 {
        Ok(format!("CAP_IPC_LOCK held: may pin any amount; {rlimit}"))
    } else if limit.rlim_cur == libc::RLIM_INFINITY {
        Ok(format!("no CAP_IPC_LOCK, but {rlimit}"))
    } else {
        Err(format!(
            "no CAP_IPC_LOCK; {rlimit} caps how much can be pinned"
        ))
    }
}
