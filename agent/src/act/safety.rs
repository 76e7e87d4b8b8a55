//! Who infermem never acts on: pid 1, kernel threads, the agent itself, a pid that is no
//! longer the process the policy chose (reused), and the cgroups that hold pid 1 or the
//! agent. Every action is checked here right before it is applied.

use super::{Action, ProcessRef};
use crate::daemon::sample::is_under;

/// `PF_KTHREAD` in `/proc/<pid>/stat`'s flags.
const PF_KTHREAD: u32 = 0x0020_0000;

/// What the checks need to know about the agent and the host.
#[derive(Debug, Clone)]
pub struct Guard {
    pub agent_pid: u32,
    /// The agent's memory cgroup, and pid 1's.
    pub agent_cgroup: Option<String>,
    pub init_cgroup: Option<String>,
}

impl Guard {
    /// The guard for this process.
    pub fn for_this_agent(layout: &crate::collect::cgroup::CgroupLayout) -> Guard {
        let cgroup_of = |pid| crate::collect::cgroup::memory_cgroup_path(pid, layout);
        Guard {
            agent_pid: std::process::id(),
            agent_cgroup: cgroup_of(std::process::id()),
            init_cgroup: cgroup_of(1),
        }
    }

    /// Why `action` must not be applied now, if it must not.
    pub fn refuse(&self, action: &Action) -> Option<String> {
        if let Some(why) = action.process().and_then(|p| self.refuse_process(p)) {
            return Some(why);
        }
        match action {
            Action::CgroupWrite { cgroup, .. } => self.refuse_cgroup(cgroup),
            _ => None,
        }
    }

    /// Why a process must not be acted on: pid 1, the agent, a kernel thread, or not the
    /// process the decision was about any more.
    pub fn refuse_process(&self, process: &ProcessRef) -> Option<String> {
        let pid = process.pid;
        if pid <= 1 {
            return Some(format!("pid {pid} is init: never acted on"));
        }
        if pid == self.agent_pid {
            return Some("the agent never acts on itself".to_owned());
        }
        let stat = match procfs::process::Process::new(pid as i32).and_then(|p| p.stat()) {
            Ok(stat) => stat,
            Err(_) => return Some(format!("pid {pid} has exited")),
        };
        if stat.flags & PF_KTHREAD != 0 {
            return Some(format!("pid {pid} is a kernel thread: never acted on"));
        }
        (stat.starttime != process.start_time).then(|| {
            format!(
                "pid {pid} is another process now (start time {} instead of {}): pid reused",
                stat.starttime, process.start_time
            )
        })
    }

    /// Why a cgroup must not be written: the root, or one that holds pid 1 or the agent.
    pub fn refuse_cgroup(&self, cgroup: &str) -> Option<String> {
        if cgroup.trim_matches('/').is_empty() {
            return Some("the root cgroup is never written".to_owned());
        }
        let holds =
            |inside: &Option<String>| inside.as_deref().is_some_and(|c| is_under(c, cgroup));
        if holds(&self.agent_cgroup) {
            return Some(format!("{cgroup} holds the agent: never written"));
        }
        if holds(&self.init_cgroup) {
            return Some(format!("{cgroup} holds pid 1: never written"));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard {
            agent_pid: std::process::id(),
            agent_cgroup: Some("/system.slice/infermem.service".into()),
            init_cgroup: Some("/init.scope".into()),
        }
    }

    fn me() -> ProcessRef {
        let id = crate::collect::process::identity(std::process::id()).unwrap();
        ProcessRef {
            pid: id.pid,
            start_time: id.start_time,
            comm: id.comm,
        }
    }

    #[test]
    fn init_the_agent_kernel_threads_and_reused_pids_are_refused() {
        let g = guard();
        let init = ProcessRef {
            pid: 1,
            start_time: 1,
            comm: "init".into(),
        };
        assert!(g.refuse_process(&init).unwrap().contains("init"));
        assert!(g.refuse_process(&me()).unwrap().contains("itself"));
        // kthreadd is pid 2 on Linux.
        let kthreadd = ProcessRef {
            pid: 2,
            start_time: 0,
            comm: "kthreadd".into(),
        };
        assert!(
            g.refuse_process(&kthreadd)
                .unwrap()
                .contains("kernel thread")
        );
        let other = Guard {
            agent_pid: 0,
            ..guard()
        };
        assert_eq!(other.refuse_process(&me()), None);
        let reused = ProcessRef {
            start_time: me().start_time + 1,
            ..me()
        };
        assert!(other.refuse_process(&reused).unwrap().contains("reused"));
    }

    #[test]
    fn the_root_and_the_cgroups_of_init_and_the_agent_are_never_written() {
        let g = guard();
        for refused in [
            "/",
            "/system.slice",
            "/system.slice/infermem.service",
            "/init.scope",
        ] {
            assert!(g.refuse_cgroup(refused).is_some(), "{refused}");
        }
        assert_eq!(g.refuse_cgroup("/system.slice/ollama.service"), None);
        // A sibling whose name starts like the agent's is another cgroup.
        assert_eq!(g.refuse_cgroup("/system.slice/infermem.service2"), None);
    }
}
