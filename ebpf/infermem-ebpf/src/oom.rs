//! OOM-killer victims (`oom:mark_victim`), with the victim's memcg and RSS at the kill.
//!
//! The tracepoint has two prototypes: `(struct task_struct *task, uid_t uid)` since Linux 6.8
//! (and 6.1.133), `(int pid)` before. The agent reads the running kernel's prototype from BTF
//! and loads the matching program; the other one is never loaded.

use aya_ebpf::{
    helpers::bpf_get_current_task, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use infermem_common::{Probe, UNKNOWN_VALUE};

use crate::{
    kernel::{memcg_id, read_field, read_ptr},
    maps::{count_event, emit_oom, offsets},
};

/// `mark_victim(struct task_struct *task, uid_t uid)`.
#[btf_tracepoint(function = "mark_victim")]
pub fn mark_victim(ctx: BtfTracePointContext) -> i32 {
    let task: u64 = ctx.arg(0);
    report_task(task);
    0
}

/// `mark_victim(int pid)`: only the victim's pid is given. When the victim is the task that
/// ran into the limit (the usual case in a memcg holding one process), it is the current task
/// and everything is read from it; otherwise only the pid is reported.
#[btf_tracepoint(function = "mark_victim")]
pub fn mark_victim_pid(ctx: BtfTracePointContext) -> i32 {
    let pid: u64 = ctx.arg(0);
    let pid = pid as u32 as i32;
    // SAFETY: a helper with no preconditions.
    let current = unsafe { bpf_get_current_task() };
    if read_field::<i32>(current, offsets().task_pid) == Some(pid) {
        report_task(current);
    } else {
        count_event(Probe::OomVictim);
        emit_oom(pid as u32, [UNKNOWN_VALUE; 6], [0; 16]);
    }
    0
}

/// Reports the victim `task`: pid, comm, memcg, RSS by type, swap and `oom_score_adj`.
#[inline(always)]
fn report_task(task: u64) {
    let o = offsets();
    let Some(tgid) = read_field::<i32>(task, o.task_tgid) else {
        return;
    };
    let comm = read_field::<[u8; 16]>(task, o.task_comm).unwrap_or([0; 16]);

    let mm = read_ptr(task, o.task_mm).unwrap_or(0);
    let rss = |i: usize| {
        read_field::<i64>(mm, o.mm_rss[i])
            .map(|pages| pages.max(0) as u64)
            .unwrap_or(UNKNOWN_VALUE)
    };

    let oom_score_adj = read_ptr(task, o.task_signal)
        .and_then(|signal| read_field::<i16>(signal, o.signal_oom_score_adj))
        .map(|adj| adj as i64 as u64)
        .unwrap_or(UNKNOWN_VALUE);

    count_event(Probe::OomVictim);
    emit_oom(
        tgid as u32,
        [
            memcg_id(task),
            rss(0),
            rss(1),
            rss(2),
            rss(3),
            oom_score_adj,
        ],
        comm,
    );
}
