//! The agent's answers to the local API, built from the registry and filtered by who asks.

use std::{sync::Arc, time::Duration, time::Instant};

use crate::{
    api::{self, Peer, Service, WatchTarget, proto},
    predict::Assessment,
};

use super::{
    Agent, Mode,
    registry::{ProcessKey, Registry, TrackedCgroup, TrackedProcess},
    sample::is_under,
    unix_now,
};

/// How long a `watch` keeps its process sampled every tick after its last update.
const WATCH_HOLD: Duration = Duration::from_secs(5);

/// The API over a shared agent.
#[derive(Clone)]
pub struct AgentService(pub Arc<Agent>);

impl Service for AgentService {
    fn ps(&self, peer: &Peer) -> proto::PsReply {
        let registry = self.0.lock();
        let mut workloads: Vec<proto::Workload> = registry
            .processes
            .values()
            .filter(|p| p.model.report.is_some() && peer.may_see(p.uid))
            .map(workload)
            .collect();
        {
            let gpu = self.0.gpu();
            for w in &mut workloads {
                w.gpu = super::gpu_api::process_gpu(&gpu, w.pid);
            }
        }
        workloads.sort_by_key(|w| w.pid);
        proto::PsReply {
            workloads,
            daemon: Some(daemon_info(&self.0, &registry)),
        }
    }

    fn status(&self, peer: &Peer) -> proto::StatusReply {
        let registry = self.0.lock();
        let mut cgroups: Vec<proto::CgroupStatus> = registry
            .cgroups
            .iter()
            .filter(|(path, _)| visible_cgroup(&registry, peer, path))
            .map(|(path, c)| cgroup_status(&registry, path, c))
            .collect();
        cgroups.sort_by(|a, b| a.path.cmp(&b.path));
        proto::StatusReply {
            host: Some(host_status(&registry)),
            cgroups,
            oom_kills: registry
                .oom_kills
                .iter()
                .filter(|k| k.uid.is_some_and(|uid| peer.may_see(uid)) || peer.sees_all)
                .map(|k| proto::OomKill {
                    ts_unix: k.ts_unix,
                    pid: k.pid,
                    comm: k.comm.clone(),
                    memcg: k.memcg.clone().unwrap_or_default(),
                    rss_anon_bytes: k.rss_anon_bytes,
                    rss_file_bytes: k.rss_file_bytes,
                    uid: k.uid,
                })
                .collect(),
            daemon: Some(daemon_info(&self.0, &registry)),
            gpu: Some(super::gpu_api::gpu_status(&self.0)),
        }
    }

    fn watch(
        &self,
        peer: &Peer,
        target: &mut WatchTarget,
    ) -> Result<proto::WatchUpdate, proto::Error> {
        let label = target.label();
        let mut registry = self.0.lock();
        let mut update = match target {
            WatchTarget::Pid { pid, start_time } => {
                watch_process(&mut registry, peer, *pid, start_time)?
            }
            WatchTarget::Cgroup(path) => {
                let exists = self.0.cgroup_exists(path);
                watch_cgroup(&registry, peer, path, exists)?
            }
            WatchTarget::Host => watch_host(&registry),
        };
        update.ts = unix_now();
        update.target = label;
        Ok(update)
    }

    fn actions(&self, peer: &Peer) -> Result<proto::ActionsReply, proto::Error> {
        super::act_api::actions(&self.0, peer)
    }

    fn revert(&self, peer: &Peer) -> Result<proto::ActReply, proto::Error> {
        super::act_api::revert(&self.0, peer)
    }

    fn pin(
        &self,
        peer: &Peer,
        request: proto::PinRequest,
        pin: bool,
    ) -> Result<proto::ActReply, proto::Error> {
        super::act_api::pin(&self.0, peer, request, pin)
    }

    async fn inspect(
        &self,
        peer: &Peer,
        pid: u32,
        duration: Duration,
    ) -> Result<proto::InspectReply, proto::Error> {
        let uid = self.0.lock().processes.get(&pid).map(|p| p.uid);
        if uid.is_some_and(|uid| !peer.may_see(uid)) {
            return Err(inspect_error(
                pid,
                "permission_denied",
                format!("pid {pid} belongs to another user"),
            ));
        }
        let report = crate::inspect::inspect_in_agent(Arc::clone(&self.0), pid, duration).await;
        match report {
            Ok(report) => Ok(proto::InspectReply {
                report_json: serde_json::to_string(&report).unwrap_or_default(),
            }),
            Err(err) => Err(proto::Error {
                kind: err.to_report().error.kind,
                message: err.to_string(),
                report_json: serde_json::to_string(&err.to_report()).unwrap_or_default(),
            }),
        }
    }
}

/// An inspect error with the error document `inspect --json` prints.
fn inspect_error(pid: u32, kind: &str, message: String) -> proto::Error {
    let report = crate::report::ErrorReport {
        error: crate::report::ErrorBody {
            kind: kind.to_owned(),
            message: message.clone(),
            pid: Some(pid),
            oom_kill: None,
        },
    };
    proto::Error {
        kind: kind.to_owned(),
        message,
        report_json: serde_json::to_string(&report).unwrap_or_default(),
    }
}

/// The API's form of an assessment.
pub fn assessment(a: &Assessment) -> proto::Assessment {
    proto::Assessment {
        level: a.level.to_string(),
        eta_seconds: a.eta_seconds,
        eta_low_seconds: a.eta_low_seconds,
        eta_high_seconds: a.eta_high_seconds,
        domain: a.domain.clone(),
        victim_pid: a.victim_pid,
        thrashing: a.thrashing,
        reasons: a.reasons.clone(),
    }
}

fn workload(p: &TrackedProcess) -> proto::Workload {
    let report = p
        .model
        .report
        .as_ref()
        .expect("filtered on model processes");
    let prediction = report.prediction.as_ref();
    let main = prediction.map(|pr| pr.model_file.clone());
    let main_file = report
        .files
        .iter()
        .find(|f| Some(&f.file.path) == main.as_ref())
        .or(report.files.first());
    proto::Workload {
        pid: p.state.identity.pid,
        start_time: p.state.identity.start_time,
        uid: p.uid,
        comm: p.state.identity.comm.clone(),
        runtime: report.runtime.id(),
        model: main_file
            .map(|f| f.file.path.display().to_string())
            .unwrap_or_default(),
        weights_bytes: prediction.map_or_else(
            || report.files.iter().map(|f| f.file.size_bytes).sum(),
            |pr| pr.weights_bytes,
        ),
        weights_resident_bytes: report.files.iter().map(|f| f.resident_bytes).sum(),
        kv_bytes_now: prediction.and_then(|pr| pr.kv_bytes_now),
        kv_bytes_max: prediction.and_then(|pr| pr.kv_bytes_at_max_ctx),
        n_ctx: prediction.and_then(|pr| pr.n_ctx.as_ref().map(|s| s.value)),
        rss_bytes: p.usage.map_or(0, |u| u.rss + u.swap),
        predicted_peak_bytes: prediction.and_then(|pr| pr.peak_ram_bytes),
        cgroup: p.memcg.clone().unwrap_or_default(),
        risk: Some(assessment(&p.assessment)),
        virtual_bytes: p.vm.map_or(0, |vm| vm.virtual_bytes),
        anon_bytes: p.usage.map_or(0, |u| u.anon),
        swap_bytes: p.usage.map_or(0, |u| u.swap),
        minor_faults: p.vm.map_or(0, |vm| vm.minor_faults),
        major_faults: p.vm.map_or(0, |vm| vm.major_faults),
        model_file_faults: p.model_faults.last().map(|f| f as u64),
        executable: executable_name(&p.state.identity),
        container_id: p
            .memcg
            .as_deref()
            .and_then(crate::collect::cgroup::container_id)
            .unwrap_or_default()
            .to_owned(),
        command_line: crate::model::redact::cmdline(&p.state.identity.cmdline).join(" "),
        model_file_bytes: report.files.iter().map(|f| f.file.size_bytes).sum(),
        gpu: Vec::new(),
    }
}

/// The base name of a process's executable, or its comm when `/proc/<pid>/exe` was not
/// readable.
fn executable_name(identity: &crate::collect::process::ProcessIdentity) -> String {
    identity
        .exe
        .as_deref()
        .and_then(|exe| exe.file_name())
        .map_or_else(
            || identity.comm.clone(),
            |name| name.to_string_lossy().into_owned(),
        )
}

fn daemon_info(agent: &Agent, registry: &Registry) -> proto::DaemonInfo {
    let probes = agent.probes();
    let drops = probes.as_ref().map_or(0, |p| {
        p.probe_stats()
            .iter()
            .map(|(_, s)| s.ringbuf_drops)
            .sum::<u64>()
    });
    let unavailable = probes.as_ref().map_or_else(Vec::new, |p| {
        p.unavailable()
            .iter()
            .map(|(probe, why)| format!("{}: {why}", probe.tracepoint()))
            .collect()
    });
    proto::DaemonInfo {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_unix: agent.started_unix(),
        processes: registry.processes.len() as u64,
        ebpf: agent.ebpf_reason().is_none(),
        ebpf_reason: agent.ebpf_reason().unwrap_or_default().to_owned(),
        events: registry.events,
        ringbuf_drops: drops,
        mode: match agent.mode() {
            Mode::Daemon => "daemon",
            Mode::Standalone => "standalone",
        }
        .to_owned(),
        probes_unavailable: unavailable,
        oom_kills_seen: registry.oom_kills_seen,
    }
}

fn host_status(registry: &Registry) -> proto::HostStatus {
    let host = &registry.host;
    let memory = host.last.as_ref();
    let last = host.samples.back();
    proto::HostStatus {
        mem_total_bytes: memory.map_or(0, |m| m.total_bytes),
        mem_available_bytes: memory.and_then(|m| m.available_bytes).unwrap_or(0),
        mem_free_bytes: memory.map_or(0, |m| m.free_bytes),
        swap_total_bytes: memory.map_or(0, |m| m.swap_total_bytes),
        swap_free_bytes: memory.map_or(0, |m| m.swap_free_bytes),
        model_file_bytes: last.map_or(0, |s| s.model_file_bytes),
        psi_some_avg10: host.pressure.map(|p| p.some.avg10),
        psi_full_avg10: host.pressure.and_then(|p| p.full.map(|f| f.avg10)),
        limit_bytes: memory.map_or(0, crate::predict::domain::host_limit),
        used_bytes: last.map_or(0, |s| s.needed_bytes()),
        risk: Some(assessment(&host.assessment)),
    }
}

fn cgroup_status(registry: &Registry, path: &str, c: &TrackedCgroup) -> proto::CgroupStatus {
    let processes = registry
        .processes
        .values()
        .filter(|p| p.memcg.as_deref().is_some_and(|m| is_under(m, path)))
        .count();
    proto::CgroupStatus {
        path: path.to_owned(),
        version: c.last.version.to_string(),
        usage_bytes: c.last.usage_bytes.unwrap_or(0),
        limit_bytes: c.last.limit_bytes,
        effective_limit_bytes: c.last.effective_limit_bytes,
        psi_some_avg10: c.pressure.map(|p| p.some.avg10),
        oom_kills: c.events.oom_kill.unwrap_or(0),
        high_events: c.events.high.unwrap_or(0),
        max_events: c.events.max.or(c.events.failcnt).unwrap_or(0),
        processes: processes as u32,
        risk: Some(assessment(&c.assessment)),
    }
}

/// A cgroup is visible to those who see everything, and to a user with a process in it.
fn visible_cgroup(registry: &Registry, peer: &Peer, path: &str) -> bool {
    peer.sees_all
        || registry
            .processes
            .values()
            .any(|p| p.uid == peer.uid && p.memcg.as_deref().is_some_and(|m| is_under(m, path)))
}

fn watch_process(
    registry: &mut Registry,
    peer: &Peer,
    pid: u32,
    start_time: &mut Option<u64>,
) -> Result<proto::WatchUpdate, proto::Error> {
    let current = registry.processes.get(&pid).map(TrackedProcess::key);
    let key = match (*start_time, current) {
        (None, Some(key)) => key,
        (None, None) => {
            return Err(api::error(
                "no_such_process",
                format!("no such process: pid {pid}"),
            ));
        }
        (Some(start_time), _) => ProcessKey { pid, start_time },
    };
    if start_time.is_none() {
        *start_time = Some(key.start_time);
    }
    if let Some(ended) = registry.end_of(key).cloned() {
        return Ok(ended_update(ended.reason));
    }
    let Some(tracked) = registry.process_mut(key) else {
        // Gone before an exit was recorded, or the pid now names another process.
        return Ok(ended_update("exited"));
    };
    if !peer.may_see(tracked.uid) {
        return Err(api::error(
            "permission_denied",
            format!("pid {pid} belongs to another user"),
        ));
    }
    tracked.watched_until = Some(Instant::now() + WATCH_HOLD);
    let limit = limit_of(registry, tracked_domain(registry, key));
    let tracked = registry.process(key).expect("looked up above");
    Ok(proto::WatchUpdate {
        risk: Some(assessment(&tracked.assessment)),
        rss_bytes: tracked.usage.map(|u| u.rss + u.swap),
        limit_bytes: limit,
        ..proto::WatchUpdate::default()
    })
}

/// The domain of a process's last assessment.
fn tracked_domain(registry: &Registry, key: ProcessKey) -> Option<String> {
    registry.process(key)?.assessment.domain.clone()
}

/// The limit of a domain (`host` or a cgroup path).
fn limit_of(registry: &Registry, domain: Option<String>) -> Option<u64> {
    match domain.as_deref() {
        Some("host") => registry
            .host
            .last
            .as_ref()
            .map(crate::predict::domain::host_limit),
        Some(path) => registry.cgroups.get(path)?.last.effective_limit_bytes,
        None => None,
    }
}

fn ended_update(reason: &str) -> proto::WatchUpdate {
    proto::WatchUpdate {
        risk: Some(assessment(&Assessment::default())),
        ended: true,
        end_reason: reason.to_owned(),
        ..proto::WatchUpdate::default()
    }
}

fn watch_cgroup(
    registry: &Registry,
    peer: &Peer,
    path: &str,
    exists: bool,
) -> Result<proto::WatchUpdate, proto::Error> {
    if !exists {
        return Ok(ended_update("the cgroup was removed"));
    }
    if !visible_cgroup(registry, peer, path) {
        return Err(api::error(
            "permission_denied",
            format!("no process of yours is in cgroup {path}"),
        ));
    }
    let Some(cgroup) = registry.cgroups.get(path) else {
        // No process in it yet: nothing to assess.
        return Ok(proto::WatchUpdate {
            risk: Some(assessment(&Assessment::default())),
            ..proto::WatchUpdate::default()
        });
    };
    Ok(proto::WatchUpdate {
        risk: Some(assessment(&cgroup.assessment)),
        rss_bytes: cgroup.last.usage_bytes,
        limit_bytes: cgroup.last.effective_limit_bytes,
        ..proto::WatchUpdate::default()
    })
}

fn watch_host(registry: &Registry) -> proto::WatchUpdate {
    let host = host_status(registry);
    proto::WatchUpdate {
        risk: host.risk,
        rss_bytes: Some(host.used_bytes),
        limit_bytes: Some(host.limit_bytes),
        ..proto::WatchUpdate::default()
    }
}
