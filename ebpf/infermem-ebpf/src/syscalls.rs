//! mmap, munmap, mremap and brk: arguments saved on entry, accounted on exit.
//!
//! They also hand `ioctl`, `open`, `close` and `dup*` to [`crate::nvidia`].
//!
//! Both probes sit on the raw `sys_enter`/`sys_exit` tracepoints, which fire for every syscall;
//! everything but the four memory syscalls leaves after one comparison.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use infermem_common::{EventKind, LARGE_MAPPING_BYTES, Probe, ProcMemory, SyscallArgs, mmap_flags};

use crate::{
    buckets,
    kernel::{atomic_add, syscall_arg, syscall_args, syscall_nr},
    maps::{
        SYSCALL_ARGS, bucket_policy, bump_bucket_epoch, count_event, count_map_drop, emit,
        proc_memory, stats, syscall_numbers,
    },
    nvidia,
};

#[inline(always)]
fn is_memory_syscall(nr: u64) -> bool {
    let n = syscall_numbers();
    nr == n.mmap || nr == n.munmap || nr == n.mremap || nr == n.brk
}

#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter(ctx: BtfTracePointContext) -> i32 {
    let nr: u64 = ctx.arg(1);
    let memory = is_memory_syscall(nr);
    if !memory && !nvidia::is_nvidia_syscall(nr) {
        return 0;
    }
    let regs: *const u64 = ctx.arg(0);
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !memory {
        // Reads only the arguments it needs: most of these calls are not NVIDIA's.
        nvidia::on_enter(tgid, tid, nr, regs);
        return 0;
    }
    // SAFETY: `regs` is the tracepoint's trusted pt_regs argument.
    let args = unsafe { syscall_args(regs) };
    let saved = SyscallArgs { nr, args };
    if SYSCALL_ARGS.insert(tid, saved, 0).is_err() {
        count_map_drop(Probe::SysEnter);
    }
    count_event(Probe::SysEnter);
    0
}

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit(ctx: BtfTracePointContext) -> i32 {
    let regs: *const u64 = ctx.arg(0);
    // SAFETY: `regs` is the tracepoint's trusted pt_regs argument.
    let nr = unsafe { syscall_nr(regs) };
    let memory = is_memory_syscall(nr);
    if !memory && !nvidia::is_nvidia_syscall(nr) {
        return 0;
    }
    let ret: i64 = ctx.arg(1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !memory {
        // Only the calls on NVIDIA fds and paths were saved (`close` never is: it is done
        // at entry).
        let n = syscall_numbers();
        // SAFETY: `regs` is the tracepoint's trusted pt_regs argument.
        if nr == n.close
            || (nr == n.ioctl && !nvidia::is_decoded_escape(unsafe { syscall_arg(regs, 1) }))
        {
            return 0;
        }
        if let Some(saved) = SYSCALL_ARGS.get_ptr(tid) {
            // SAFETY: a valid map value pointer; copied before the entry is removed.
            let saved = unsafe { *saved };
            let _ = SYSCALL_ARGS.remove(tid);
            if saved.nr == nr {
                nvidia::on_exit(tgid, &saved, ret);
            }
        }
        return 0;
    }
    let Some(saved) = SYSCALL_ARGS.get_ptr(tid) else {
        if let Some(s) = stats(Probe::SysExit) {
            s.unmatched += 1;
        }
        return 0;
    };
    // SAFETY: a valid map value pointer; copied before the entry is removed.
    let saved = unsafe { *saved };
    let _ = SYSCALL_ARGS.remove(tid);
    if saved.nr != nr {
        if let Some(s) = stats(Probe::SysExit) {
            s.unmatched += 1;
        }
        return 0;
    }
    count_event(Probe::SysExit);
    let Some(memory) = proc_memory(tgid, Probe::SysExit) else {
        return 0;
    };
    // -4095..-1 are errors for every syscall here (brk reports failure by not moving).
    if (-4095..0).contains(&ret) {
        // SAFETY: a valid map value pointer.
        unsafe { atomic_add(&mut memory.failed_calls, 1) };
        return 0;
    }
    let ret = ret as u64;
    let n = syscall_numbers();
    if nr == n.mmap {
        on_mmap(tgid, memory, &saved.args, ret);
    } else if nr == n.munmap {
        on_munmap(tgid, memory, &saved.args);
    } else if nr == n.mremap {
        on_mremap(tgid, memory, &saved.args, ret);
    } else {
        on_brk(tgid, memory, ret);
    }
    0
}

/// `mmap(addr, len, prot, flags, fd, pgoff)` returned `addr_out`.
// Not inlined: a separate subprogram keeps the verifier's path count linear.
#[inline(never)]
fn on_mmap(tgid: u32, memory: &mut ProcMemory, args: &[u64; 6], addr_out: u64) {
    let (len, prot, flags, fd, pgoff) = (args[1], args[2], args[3], args[4] as i32, args[5]);
    let anonymous = flags & mmap_flags::MAP_ANONYMOUS != 0 || fd < 0;
    // SAFETY (all atomic_add calls below): pointers into a valid map value.
    unsafe {
        atomic_add(&mut memory.mmap_calls, 1);
        if anonymous {
            atomic_add(&mut memory.mmap_anon_bytes, len);
        } else {
            atomic_add(&mut memory.mmap_file_bytes, len);
        }
    }
    if len < LARGE_MAPPING_BYTES {
        return;
    }
    if !anonymous {
        add_file_mapping(tgid, memory, addr_out, len);
    }
    let fd = if anonymous { u64::MAX } else { fd as u64 };
    emit(
        Probe::SysExit,
        EventKind::Mmap,
        tgid,
        [addr_out, len, prot, flags, fd, pgoff],
        [0; 16],
    );
}

/// `munmap(addr, len)` succeeded.
// Not inlined: a separate subprogram keeps the verifier's path count linear.
#[inline(never)]
fn on_munmap(tgid: u32, memory: &mut ProcMemory, args: &[u64; 6]) {
    let (addr, len) = (args[0], args[1]);
    // SAFETY: pointers into a valid map value.
    unsafe {
        atomic_add(&mut memory.munmap_calls, 1);
        atomic_add(&mut memory.munmap_bytes, len);
    }
    if memory.file_buckets > 0 {
        remove_file_range(tgid, memory, addr, len);
    }
    if len >= LARGE_MAPPING_BYTES {
        emit(
            Probe::SysExit,
            EventKind::Munmap,
            tgid,
            [addr, len, 0, 0, 0, 0],
            [0; 16],
        );
    }
}

/// `mremap(old_addr, old_len, new_len, flags, new_addr)` returned `new_addr_out`.
// Not inlined: a separate subprogram keeps the verifier's path count linear.
#[inline(never)]
fn on_mremap(tgid: u32, memory: &mut ProcMemory, args: &[u64; 6], new_addr_out: u64) {
    let (old_addr, old_len, new_len) = (args[0], args[1], args[2]);
    // SAFETY: pointers into a valid map value.
    unsafe {
        atomic_add(&mut memory.mremap_calls, 1);
        if new_len >= old_len {
            atomic_add(&mut memory.mremap_grow_bytes, new_len - old_len);
        } else {
            atomic_add(&mut memory.mremap_shrink_bytes, old_len - new_len);
        }
    }
    // A remapped file mapping keeps being a file mapping at its new place.
    if memory.file_buckets > 0 && buckets::mapping_at(tgid, old_addr).is_some() {
        remove_file_range(tgid, memory, old_addr, old_len);
        if new_len >= LARGE_MAPPING_BYTES {
            add_file_mapping(tgid, memory, new_addr_out, new_len);
        }
    }
    if old_len.max(new_len) >= LARGE_MAPPING_BYTES {
        emit(
            Probe::SysExit,
            EventKind::Mremap,
            tgid,
            [old_addr, old_len, new_addr_out, new_len, 0, 0],
            [0; 16],
        );
    }
}

/// `brk` left the program break at `new_brk`.
// Not inlined: a separate subprogram keeps the verifier's path count linear.
#[inline(never)]
fn on_brk(tgid: u32, memory: &mut ProcMemory, new_brk: u64) {
    let old_brk = memory.brk_last;
    memory.brk_last = new_brk;
    // SAFETY: pointers into a valid map value.
    unsafe { atomic_add(&mut memory.brk_calls, 1) };
    if old_brk == 0 || old_brk == new_brk {
        return;
    }
    let step = if new_brk > old_brk {
        // SAFETY: as above.
        unsafe { atomic_add(&mut memory.brk_grow_bytes, new_brk - old_brk) };
        new_brk - old_brk
    } else {
        // SAFETY: as above.
        unsafe { atomic_add(&mut memory.brk_shrink_bytes, old_brk - new_brk) };
        old_brk - new_brk
    };
    if step >= LARGE_MAPPING_BYTES {
        emit(
            Probe::SysExit,
            EventKind::Brk,
            tgid,
            [old_brk, new_brk, 0, 0, 0, 0],
            [0; 16],
        );
    }
}

// Not inlined: a separate subprogram keeps the verifier's path count linear.
#[inline(never)]
fn add_file_mapping(tgid: u32, memory: &mut ProcMemory, addr: u64, len: u64) {
    let policy = bucket_policy();
    if len < policy.min_mapping_bytes {
        return;
    }
    // Racy between threads of one process mapping at the same instant: the quota can be
    // passed by one mapping per such thread, which keeps it a bound.
    let end = addr.saturating_add(len);
    if memory.file_buckets + buckets::bucket_count(addr, end) as u64 > policy.max_per_process {
        // SAFETY: a pointer into a valid map value.
        unsafe { atomic_add(&mut memory.mappings_over_quota, 1) };
        if let Some(s) = stats(Probe::SysExit) {
            s.over_quota += 1;
        }
        return;
    }
    if buckets::insert(tgid, memory, addr, end) {
        bump_bucket_epoch();
    }
}

// Not inlined: a separate subprogram keeps the verifier's path count linear.
#[inline(never)]
fn remove_file_range(tgid: u32, memory: &mut ProcMemory, addr: u64, len: u64) {
    if buckets::remove(tgid, memory, addr, addr.saturating_add(len)) {
        bump_bucket_epoch();
    }
}
