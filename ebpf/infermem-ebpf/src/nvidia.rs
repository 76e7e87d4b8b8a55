//! The NVIDIA driver's RM ioctls: which fds are NVIDIA fds, and a copy of every RM escape that
//! allocates, frees or shares GPU memory, taken at syscall exit and sent to the agent.
//!
//! - fds: learned at `open`/`openat` of `/dev/nvidiactl`, `/dev/nvidia-uvm` or `/dev/nvidiaN`
//!   (the path is read at entry), carried over by `dup`/`dup2`/`dup3`, forgotten at `close`;
//!   the agent seeds the fds opened before it started from `/proc/*/fd`.
//! - ioctls: at entry, an `_IOWR('F', nr, size)` command of interest on a known NVIDIA fd
//!   saves its arguments; at exit, if the syscall returned 0, its parameter block (and, for
//!   `NV_ESC_RM_ALLOC`, its allocation parameters) is copied from the caller's memory into a
//!   [`GpuIoctl`] record on [`GPU_EVENTS`]. RM's own verdict (the `status` field) is in those
//!   bytes: the agent decodes them with the running driver's layout and counts only successes.
//!
//! Everything else leaves after a comparison of the syscall number (and, for `ioctl`, of the
//! command's type and number), so that the host's other syscalls pay almost nothing.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{
        bpf_probe_read_user,
        generated::{self, bpf_ktime_get_ns},
    },
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use infermem_common::{
    GPU_ALLOC_PARAMS_MAX, GPU_PARAMS_MAX, GpuIoctl, GpuProbeStats, NvidiaFdKey, SyscallArgs,
    nvidia_fd,
};

use crate::{
    kernel::syscall_arg,
    maps::{SYSCALL_ARGS, syscall_numbers},
};

/// The NVIDIA fds of every process; the agent removes a process's entries when it exits.
#[map]
pub static NVIDIA_FDS: HashMap<NvidiaFdKey, u32> =
    HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// RM escapes for the agent. 1 MiB holds about 2 900 records: a CUDA context's creation makes
/// a few hundred RM objects; a caching allocator (PyTorch's) allocates rarely after warm-up.
#[map]
pub static GPU_EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

/// Health counters of these probes.
#[map]
pub static GPU_STATS: PerCpuArray<GpuProbeStats> = PerCpuArray::with_max_entries(1, 0);

/// `NV_IOCTL_MAGIC`, the type byte of every RM escape.
const NV_IOCTL_MAGIC: u64 = b'F' as u64;
/// The escape numbers the agent decodes (nv_escape.h, unchanged from 515 to 595).
const RM_ALLOC_MEMORY: u64 = 0x27;
const RM_FREE: u64 = 0x29;
const RM_ALLOC: u64 = 0x2b;
const RM_DUP_OBJECT: u64 = 0x34;
const RM_VID_HEAP_CONTROL: u64 = 0x4a;
/// `NV_ESC_IOCTL_XFER_CMD`: carries another command whose parameters are too large for the
/// ioctl encoding, as `{cmd: u32, size: u32, ptr: u64}`.
const IOCTL_XFER_CMD: u64 = 0xd3;
/// Offset of `pAllocParms` in NVOS21 and NVOS64 alike.
const ALLOC_PARAMS_POINTER: u64 = 16;

#[inline(always)]
fn gpu_stats() -> Option<&'static mut GpuProbeStats> {
    // SAFETY: per-CPU storage, only touched by programs running on this CPU.
    GPU_STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Whether an ioctl command is an RM escape the agent decodes (checked again at exit, from
/// the registers, so that other ioctls skip the saved-arguments lookup).
#[inline(always)]
pub fn is_decoded_escape(cmd: u64) -> bool {
    (cmd >> 8) & 0xff == NV_IOCTL_MAGIC && decoded_escape(cmd & 0xff)
}

#[inline(always)]
fn decoded_escape(nr: u64) -> bool {
    matches!(
        nr,
        RM_ALLOC_MEMORY | RM_FREE | RM_ALLOC | RM_DUP_OBJECT | RM_VID_HEAP_CONTROL | IOCTL_XFER_CMD
    )
}

/// Whether `nr` is one of the syscalls this module handles.
#[inline(always)]
pub fn is_nvidia_syscall(nr: u64) -> bool {
    let n = syscall_numbers();
    nr == n.ioctl
        || nr == n.openat
        || nr == n.open
        || nr == n.close
        || nr == n.dup
        || nr == n.dup2
        || nr == n.dup3
}

#[inline(always)]
fn fd_kind(tgid: u32, fd: u64) -> Option<u32> {
    let key = NvidiaFdKey {
        tgid,
        fd: fd as u32,
    };
    // SAFETY: a plain lookup; the value is copied.
    unsafe { NVIDIA_FDS.get(&key) }.copied()
}

fn save(tid: u32, nr: u64, args: [u64; 6]) {
    if SYSCALL_ARGS
        .insert(tid, SyscallArgs { nr, args }, 0)
        .is_err()
    {
        count(|s| s.map_drops += 1);
    }
}

/// At syscall entry: saves what the exit needs, for NVIDIA fds and the opens of NVIDIA paths.
// Not inlined: a separate subprogram keeps the verifier's path count linear.
#[inline(never)]
pub fn on_enter(tgid: u32, tid: u32, nr: u64, regs: *const u64) {
    let n = syscall_numbers();
    // SAFETY: `regs` is the tracepoint's trusted pt_regs argument; indexes are constants.
    let arg = |index: usize| unsafe { syscall_arg(regs, index) };
    if nr == n.ioctl {
        let cmd = arg(1);
        if !is_decoded_escape(cmd) {
            return;
        }
        let fd = arg(0);
        if let Some(kind) = fd_kind(tgid, fd) {
            save(tid, nr, [fd, cmd, arg(2), kind as u64, 0, 0]);
        }
    } else if nr == n.close {
        forget_fd(tgid, arg(0));
    } else if nr == n.openat || nr == n.open {
        let path = if nr == n.openat { arg(1) } else { arg(0) };
        let kind = path_kind(path);
        if kind != 0 {
            save(tid, nr, [kind as u64, 0, 0, 0, 0, 0]);
        }
    } else {
        // dup, dup2, dup3: dup2/dup3 close their target first.
        if nr != n.dup {
            forget_fd(tgid, arg(1));
        }
        if let Some(kind) = fd_kind(tgid, arg(0)) {
            save(tid, nr, [kind as u64, 0, 0, 0, 0, 0]);
        }
    }
}

#[inline(always)]
fn forget_fd(tgid: u32, fd: u64) {
    let key = NvidiaFdKey {
        tgid,
        fd: fd as u32,
    };
    // A lookup first: it takes no lock, and almost no closed fd is an NVIDIA fd.
    // SAFETY: a plain lookup.
    if unsafe { NVIDIA_FDS.get(&key) }.is_some() && NVIDIA_FDS.remove(&key).is_ok() {
        count(|s| s.fds_closed += 1);
    }
}

/// The [`nvidia_fd`] kind of the path at user address `path`, 0 if it is not an NVIDIA device
/// node: exactly `/dev/nvidiactl`, `/dev/nvidia-uvm` or `/dev/nvidia<decimal>`. Every byte is
/// read at a constant index of the buffer, which the verifier can bound (a loop over the
/// string's length it cannot).
#[inline(never)]
fn path_kind(path: u64) -> u32 {
    const PREFIX: &[u8; 11] = b"/dev/nvidia";
    // One 8-byte read settles almost every open: only "/dev/nvi…" reads the whole path.
    let head = u64::from_le_bytes([b'/', b'd', b'e', b'v', b'/', b'n', b'v', b'i']);
    // SAFETY: the helper tolerates bad user addresses.
    if unsafe { bpf_probe_read_user(path as *const [u8; 8]) }.map(u64::from_le_bytes) != Ok(head) {
        return 0;
    }
    let mut buf = [0u8; 20];
    // SAFETY: the helper writes at most `buf.len()` bytes and tolerates bad user addresses;
    // it returns the length read, NUL included.
    let len = unsafe {
        generated::bpf_probe_read_user_str(buf.as_mut_ptr() as *mut _, 20, path as *const _)
    };
    // Name bytes after the prefix: 1 to 4 ("0" to "-uvm").
    let name = len - 1 - PREFIX.len() as i64;
    if !(1..=4).contains(&name) {
        return 0;
    }
    let mut i = 0;
    while i < PREFIX.len() {
        if buf[i] != PREFIX[i] {
            return 0;
        }
        i += 1;
    }
    let (a, b, c, d) = (buf[11], buf[12], buf[13], buf[14]);
    match name {
        3 if (a, b, c) == (b'c', b't', b'l') => nvidia_fd::CTL,
        4 if (a, b, c, d) == (b'-', b'u', b'v', b'm') => nvidia_fd::UVM,
        4 => 0,
        _ => device_minor([a, b, c], name as usize).map_or(0, |n| nvidia_fd::DEVICE + n),
    }
}

/// `N` of `/dev/nvidiaN` from its first `count` (1 to 3) digits; at most
/// [`nvidia_fd::MAX_DEVICE_MINOR`].
#[inline(always)]
fn device_minor(digits: [u8; 3], count: usize) -> Option<u32> {
    let digit = |d: u8| d.is_ascii_digit().then(|| (d - b'0') as u32);
    let mut n = digit(digits[0])?;
    if count >= 2 {
        n = n * 10 + digit(digits[1])?;
    }
    if count >= 3 {
        n = n * 10 + digit(digits[2])?;
    }
    (n <= nvidia_fd::MAX_DEVICE_MINOR).then_some(n)
}

/// At syscall exit, for a call [`on_enter`] saved.
// Not inlined: a separate subprogram keeps the verifier's path count linear.
#[inline(never)]
pub fn on_exit(tgid: u32, saved: &SyscallArgs, ret: i64) {
    if ret < 0 {
        return;
    }
    let n = syscall_numbers();
    if saved.nr == n.ioctl {
        if ret == 0 {
            send(tgid, &saved.args);
        }
        return;
    }
    // open, openat, dup*: the new fd is `ret`.
    let key = NvidiaFdKey {
        tgid,
        fd: ret as u32,
    };
    if NVIDIA_FDS.insert(&key, &(saved.args[0] as u32), 0).is_err() {
        count(|s| s.map_drops += 1);
    } else {
        count(|s| s.fds_opened += 1);
    }
}

/// Copies a successful RM escape to [`GPU_EVENTS`]: `args` as saved at entry
/// (`[fd, cmd, arg, fd_kind]`).
#[inline(never)]
fn send(tgid: u32, args: &[u64; 6]) {
    let (mut cmd, mut arg) = (args[1], args[2]);
    if cmd & 0xff == IOCTL_XFER_CMD {
        // SAFETY: the helper tolerates bad user addresses.
        let Ok(xfer) = (unsafe { bpf_probe_read_user(arg as *const [u64; 2]) }) else {
            count(|s| s.read_failures += 1);
            return;
        };
        cmd = xfer[0] & 0xffff_ffff;
        arg = xfer[1];
        if (cmd >> 8) & 0xff != NV_IOCTL_MAGIC || !decoded_escape(cmd & 0xff) {
            return;
        }
    }
    count(|s| s.ioctls += 1);
    let Some(mut entry) = GPU_EVENTS.reserve::<GpuIoctl>(0) else {
        count(|s| s.ringbuf_drops += 1);
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points at a reserved, exclusively owned ring-buffer slot.
    unsafe {
        (*record).tgid = tgid;
        (*record).fd_kind = args[3] as u32;
        (*record).cmd = cmd as u32;
        (*record).ret = 0;
        (*record).time_ns = bpf_ktime_get_ns();
        let size = (cmd >> 16) & 0x3fff;
        (*record).params_len = copy_params(&mut (*record).params, arg, size);
        (*record).alloc_params_len = 0;
        if cmd & 0xff == RM_ALLOC && (*record).params_len != 0 {
            let pointer = u64::from_ne_bytes(read8(&(*record).params, ALLOC_PARAMS_POINTER));
            (*record).alloc_params_len = copy_alloc_params(&mut (*record).alloc_params, pointer);
        }
        if (*record).params_len == 0 {
            count(|s| s.read_failures += 1);
        }
    }
    entry.submit(0);
    count(|s| s.sent += 1);
}

#[inline(always)]
fn count(update: impl FnOnce(&mut GpuProbeStats)) {
    if let Some(s) = gpu_stats() {
        update(s);
    }
}

#[inline(always)]
fn read8(bytes: &[u8; GPU_PARAMS_MAX], offset: u64) -> [u8; 8] {
    let o = offset as usize;
    [
        bytes[o],
        bytes[o + 1],
        bytes[o + 2],
        bytes[o + 3],
        bytes[o + 4],
        bytes[o + 5],
        bytes[o + 6],
        bytes[o + 7],
    ]
}

/// Reads `len` bytes at user address `src` into `dst`; the length is one of a few constants
/// so that the verifier sees a bounded size. Returns the bytes read (0 on failure).
#[inline(always)]
unsafe fn read_user(dst: *mut u8, len: u32, src: u64) -> u32 {
    // SAFETY: the caller guarantees `dst` holds `len` bytes; the helper tolerates bad `src`.
    let rc = unsafe { generated::bpf_probe_read_user(dst as *mut _, len, src as *const _) };
    if rc == 0 { len } else { 0 }
}

/// Copies an escape's parameter block, whose size the command encodes: 16 (free), 28 (dup),
/// 32, 40 or 48 (alloc: NVOS21, NVOS64 up to 530, NVOS64 from 535), 56 (alloc memory) or 184
/// (vid heap). Other sizes are not copied (0): the agent counts them as undecodable.
#[inline(always)]
unsafe fn copy_params(dst: &mut [u8; GPU_PARAMS_MAX], src: u64, size: u64) -> u32 {
    let d = dst.as_mut_ptr();
    // SAFETY: every length below is at most GPU_PARAMS_MAX, the size of `dst`.
    unsafe {
        match size {
            16 => read_user(d, 16, src),
            28 => read_user(d, 28, src),
            32 => read_user(d, 32, src),
            40 => read_user(d, 40, src),
            48 => read_user(d, 48, src),
            56 => read_user(d, 56, src),
            184 => read_user(d, 184, src),
            _ => 0,
        }
    }
}

/// Copies the allocation parameters of an `NV_ESC_RM_ALLOC`: 128 bytes if readable (the
/// largest memory allocation parameters), else 16 (enough for a device's `deviceId`).
#[inline(always)]
unsafe fn copy_alloc_params(dst: &mut [u8; GPU_ALLOC_PARAMS_MAX], src: u64) -> u32 {
    if src == 0 {
        return 0;
    }
    let d = dst.as_mut_ptr();
    // SAFETY: both lengths are at most GPU_ALLOC_PARAMS_MAX, the size of `dst`.
    unsafe {
        let full = read_user(d, GPU_ALLOC_PARAMS_MAX as u32, src);
        if full != 0 {
            full
        } else {
            read_user(d, 16, src)
        }
    }
}
