//! Process exec, fork and exit: tell the agent when tracking starts or stops, and reclaim the
//! map entries of processes that are gone so maps never fill with the dead.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use infermem_common::{EventKind, FaultEntryCount, Probe};

use crate::{
    kernel::{memcg_id, process_start_ns, read_field},
    maps::{
        FAULTS, PROC_MEMORY, SYSCALL_ARGS, count_event, count_fault_entry, current_comm, emit,
        forget_process_memory, offsets,
    },
};

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`:
/// the process has a new address space, so its old mappings are gone. Sent for every process,
/// with its start time and memory cgroup.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let task: u64 = ctx.arg(0);
    forget_process_memory(tgid);
    count_event(Probe::Exec);
    emit(
        Probe::Exec,
        EventKind::Exec,
        tgid,
        [process_start_ns(task), memcg_id(task), 0, 0, 0, 0],
        current_comm(),
    );
    0
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`: a child of a
/// process with large file mappings inherits them; the agent seeds the child from /proc.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let parent_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let has_mappings = PROC_MEMORY
        .get_ptr(parent_tgid)
        // SAFETY: a valid map value pointer.
        .is_some_and(|m| unsafe { (*m).file_buckets } > 0);
    if !has_mappings {
        return 0;
    }
    let child: u64 = ctx.arg(1);
    let Some(child_tgid) = read_field::<i32>(child, offsets().task_tgid) else {
        return 0;
    };
    let child_tgid = child_tgid as u32;
    if child_tgid == parent_tgid {
        return 0; // a new thread, not a new process
    }
    count_event(Probe::Fork);
    emit(
        Probe::Fork,
        EventKind::Fork,
        parent_tgid,
        [child_tgid as u64, 0, 0, 0, 0, 0],
        [0; 16],
    );
    0
}

/// `sched_process_exit(struct task_struct *p[, bool group_dead])`: fires for every exiting
/// thread; per-process state goes when the whole thread group is dead, and an event is sent
/// for every process (one per process death), with its start time and memory cgroup.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let _ = SYSCALL_ARGS.remove(tid);
    let group_dead = if offsets().exit_has_group_dead != 0 {
        // `bool` argument: the low byte of the slot.
        ctx.arg::<u64>(1) & 0xff != 0
    } else {
        // Older kernels: the leader's exit stands for the group's.
        tid == tgid
    };
    if !group_dead {
        return 0;
    }
    count_event(Probe::Exit);
    crate::faults::forget_cached(tgid);
    if FAULTS.remove(tgid).is_ok() {
        count_fault_entry(FaultEntryCount::Removed);
    }
    let had_buckets = forget_process_memory(tgid);
    let task: u64 = ctx.arg(0);
    emit(
        Probe::Exit,
        EventKind::Exit,
        tgid,
        [
            process_start_ns(task),
            memcg_id(task),
            had_buckets as u64,
            0,
            0,
            0,
        ],
        current_comm(),
    );
    0
}
