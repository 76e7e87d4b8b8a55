//! infermem's kernel probes.
//!
//! Every probe is a BTF-enabled raw tracepoint (`tp_btf`): it attaches by name, so it needs no
//! tracefs, and it is the cheapest tracepoint flavour. The probes aggregate into maps; only rare
//! events go to the ring buffer (see `infermem_common::EventKind`).
//!
//! - `syscalls`: mmap, munmap, mremap and brk, on entry and exit.
//! - `faults`: user page faults, attributed to large file mappings or to the rest.
//! - `lifecycle`: exec, fork and exit (start and stop tracking, reclaim map entries).
//! - `oom`: OOM-killer victims.
//! - `nvidia`: the NVIDIA driver's RM ioctls (GPU memory), through the syscall probes.
#![no_std]
#![no_main]
// Atomic add without compare-and-swap (see `kernel::atomic_add`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod buckets;
mod faults;
mod kernel;
mod lifecycle;
mod maps;
mod nvidia;
mod oom;
mod syscalls;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves the programs cannot panic; this is never reached.
    loop {}
}

/// The license the kernel checks before granting GPL-only helpers (e.g. `bpf_probe_read_kernel`).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
