//! Any bytes as a sequence of NVIDIA RM ioctl records (as the kernel probes send them, but
//! forged by a hostile process), decoded with any supported driver's layout and applied to
//! the object tracker: never a panic, and the tracker's figures stay consistent (a process
//! that exited holds nothing).
#![no_main]

use infermem::gpu::{
    decode::decode,
    layout::{DriverVersion, layout_for},
    objects::GpuObjects,
};
use infermem_common::{GPU_ALLOC_PARAMS_MAX, GPU_PARAMS_MAX, GpuIoctl, nvidia_fd};
use libfuzzer_sys::fuzz_target;

/// One version of each layout table.
const VERSIONS: [&str; 5] = [
    "515.43.04",
    "525.60.13",
    "535.54.03",
    "550.54.14",
    "595.45.04",
];
/// The escapes the probes send, and one they do not.
const ESCAPES: [u32; 6] = [0x27, 0x29, 0x2b, 0x34, 0x4a, 0x2a];
/// Each escape's parameter sizes in some driver, and odd ones.
const SIZES: [u32; 9] = [16, 28, 32, 40, 48, 56, 184, 0, 0x3fff];

/// Takes `n` bytes from the front of `data` (fewer at its end).
fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = data.split_at(n.min(data.len()));
    *data = tail;
    head
}

fn byte(data: &mut &[u8]) -> u8 {
    take(data, 1).first().copied().unwrap_or(0)
}

/// One record from the front of `data`: a header of 4 bytes, then the parameter bytes.
fn record(data: &mut &[u8]) -> GpuIoctl {
    let [tgid, kind, escape, size] = [byte(data), byte(data), byte(data), byte(data)];
    let fd_kind = match kind % 4 {
        0 => nvidia_fd::CTL,
        1 => nvidia_fd::UVM,
        2 => nvidia_fd::DEVICE + u32::from(kind >> 2),
        _ => u32::from(kind) << 24,
    };
    let nr = ESCAPES[usize::from(escape) % ESCAPES.len()];
    let magic = if escape >= 0xf0 {
        u32::from(b'G')
    } else {
        u32::from(b'F')
    };
    let size = SIZES[usize::from(size) % SIZES.len()];
    let mut ioctl = GpuIoctl {
        tgid: u32::from(tgid % 4),
        fd_kind,
        cmd: (3 << 30) | (size << 16) | (magic << 8) | nr,
        ret: i32::from(escape == 0xef),
        time_ns: 0,
        params_len: 0,
        alloc_params_len: 0,
        params: [0; GPU_PARAMS_MAX],
        alloc_params: [0; GPU_ALLOC_PARAMS_MAX],
    };
    let params_taken = usize::from(byte(data)).min(GPU_PARAMS_MAX);
    let params = take(data, params_taken);
    ioctl.params[..params.len()].copy_from_slice(params);
    ioctl.params_len = u32::from(byte(data)) * 2;
    let alloc_taken = usize::from(byte(data)).min(GPU_ALLOC_PARAMS_MAX);
    let alloc = take(data, alloc_taken);
    ioctl.alloc_params[..alloc.len()].copy_from_slice(alloc);
    ioctl.alloc_params_len = u32::from(byte(data));
    ioctl
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let version = VERSIONS[usize::from(byte(&mut data)) % VERSIONS.len()];
    let layout = layout_for(&DriverVersion::parse(version).unwrap()).unwrap();
    let mut objects = GpuObjects::new();
    while !data.is_empty() {
        let ioctl = record(&mut data);
        let call = decode(layout, &ioctl);
        objects.apply(ioctl.tgid, ioctl.fd_kind, &call);
        let _ = objects.usage(ioctl.tgid);
    }
    let _ = objects.device_totals();
    for tgid in 0..4 {
        objects.process_exited(tgid);
    }
    assert!(objects.device_totals().is_empty());
});
