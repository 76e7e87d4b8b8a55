//! OOM-killer victims (`oom:mark_victim`), with the victim's memcg and RSS at the kill.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use infermem_common::{EventKind, Probe, UNKNOWN_VALUE};

use crate::{
    kernel::{read_field, read_ptr},
    maps::{count_event, emit, offsets},
};

/// `mark_victim(struct task_struct *task, uid_t uid)`.
#[btf_tracepoint(function = "mark_victim")]
pub fn mark_victim(ctx: BtfTracePointContext) -> i32 {
    let task: u64 = ctx.arg(0);
    let o = offsets();
    let Some(tgid) = read_field::<i32>(task, o.task_tgid) else {
        return 0;
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

    // task->cgroups->subsys[memory_cgrp_id]->cgroup->kn->id: the memcg's kernfs id, which is
    // the inode number of its directory in the memory cgroup hierarchy (v1 or v2).
    let memcg_id = read_ptr(task, o.task_cgroups)
        .and_then(|css_set| read_ptr(css_set, o.css_set_memory_subsys))
        .and_then(|css| read_ptr(css, o.css_cgroup))
        .and_then(|cgroup| read_ptr(cgroup, o.cgroup_kn))
        .and_then(|kn| read_field::<u64>(kn, o.kernfs_node_id))
        .unwrap_or(UNKNOWN_VALUE);

    count_event(Probe::OomVictim);
    emit(
        Probe::OomVictim,
        EventKind::OomVictim,
        tgid as u32,
        [memcg_id, rss(0), rss(1), rss(2), rss(3), oom_score_adj],
        comm,
    );
    0
}
