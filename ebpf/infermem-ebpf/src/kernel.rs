//! Reading kernel data: syscall registers, task fields at BTF-resolved offsets, atomics.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use infermem_common::{KernelOffsets, UNKNOWN_VALUE};

use crate::maps::offsets;

/// Slots (in `u64`s) of the six syscall arguments and the syscall number in `struct pt_regs`.
#[cfg(bpf_target_arch = "x86_64")]
mod regs {
    /// di, si, dx, r10, r8, r9.
    pub const ARGS: [usize; 6] = [14, 13, 12, 7, 9, 8];
    /// orig_ax.
    pub const NR: usize = 15;
}
#[cfg(bpf_target_arch = "aarch64")]
mod regs {
    /// x0..x5 (x0 is only intact on entry, which is where we read it).
    pub const ARGS: [usize; 6] = [0, 1, 2, 3, 4, 5];
    /// syscallno (an s32 in the low half of this slot).
    pub const NR: usize = 35;
}

/// Reads the six syscall arguments from the `pt_regs` a syscall tracepoint receives.
///
/// # Safety
/// `regs` must be the trusted `struct pt_regs *` argument of `sys_enter`/`sys_exit`.
#[inline(always)]
pub unsafe fn syscall_args(regs: *const u64) -> [u64; 6] {
    let mut args = [0u64; 6];
    let mut i = 0;
    while i < 6 {
        // SAFETY: the slot lies inside pt_regs; the verifier checks the access against BTF.
        args[i] = unsafe { bpf_probe_read_kernel(regs.add(regs::ARGS[i])) }.unwrap_or(0);
        i += 1;
    }
    args
}

/// Reads syscall argument `index` (a constant, 0 to 5) from `pt_regs`. At syscall exit the
/// registers of arguments 1 to 5 still hold them (x86_64 keeps `si`, `dx`…; aarch64 `x1`…);
/// only argument 0's register carries the return value on aarch64.
///
/// # Safety
/// As for [`syscall_args`].
#[inline(always)]
pub unsafe fn syscall_arg(regs: *const u64, index: usize) -> u64 {
    // SAFETY: the slot lies inside pt_regs.
    unsafe { bpf_probe_read_kernel(regs.add(regs::ARGS[index])) }.unwrap_or(0)
}

/// Reads the syscall number from `pt_regs`.
///
/// # Safety
/// As for [`syscall_args`].
#[inline(always)]
pub unsafe fn syscall_nr(regs: *const u64) -> u64 {
    // SAFETY: the slot lies inside pt_regs.
    let raw = unsafe { bpf_probe_read_kernel(regs.add(regs::NR)) }.unwrap_or(u64::MAX);
    // On aarch64 the number is an s32 in the low half.
    if cfg!(bpf_target_arch = "aarch64") {
        raw & 0xffff_ffff
    } else {
        raw
    }
}

/// Atomically adds `delta` to `*target` (wrapping; pass `delta.wrapping_neg()` to subtract).
///
/// # Safety
/// `target` must point into a map value.
#[inline(always)]
pub unsafe fn atomic_add(target: *mut u64, delta: u64) {
    // The BPF target has no compare-and-swap, so `AtomicU64::fetch_add` is not offered; the
    // intrinsic lowers to BPF's native atomic add.
    // SAFETY: map values are 8-byte aligned and live as long as the program runs.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            target, delta,
        )
    };
}

/// Reads a `T` at `base + offset` in kernel memory; `None` if the offset is unknown on this
/// kernel or the read faults.
#[inline(always)]
pub fn read_field<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == KernelOffsets::MISSING {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel tolerates bad addresses and returns an error.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.ok()
}

/// Reads a pointer field at `base + offset`; `None` if unknown or NULL.
#[inline(always)]
pub fn read_ptr(base: u64, offset: u32) -> Option<u64> {
    read_field::<u64>(base, offset).filter(|&p| p != 0)
}

/// The kernfs id of `task`'s memory cgroup: `task->cgroups->subsys[memory_cgrp_id]->cgroup->
/// kn->id`, the inode number of its directory in the memory cgroup hierarchy (v1 or v2);
/// [`UNKNOWN_VALUE`] if an offset is unknown or a pointer NULL.
#[inline(always)]
pub fn memcg_id(task: u64) -> u64 {
    let o = offsets();
    read_ptr(task, o.task_cgroups)
        .and_then(|css_set| read_ptr(css_set, o.css_set_memory_subsys))
        .and_then(|css| read_ptr(css, o.css_cgroup))
        .and_then(|cgroup| read_ptr(cgroup, o.cgroup_kn))
        .and_then(|kn| read_field::<u64>(kn, o.kernfs_node_id))
        .unwrap_or(UNKNOWN_VALUE)
}

/// The start time of `task`'s process: its thread group leader's `start_boottime` in
/// CLOCK_BOOTTIME ns (what `/proc/<pid>/stat` field 22 shows in clock ticks);
/// [`UNKNOWN_VALUE`] if unknown.
#[inline(always)]
pub fn process_start_ns(task: u64) -> u64 {
    let o = offsets();
    read_ptr(task, o.task_group_leader)
        .and_then(|leader| read_field::<u64>(leader, o.task_start_boottime))
        .unwrap_or(UNKNOWN_VALUE)
}
