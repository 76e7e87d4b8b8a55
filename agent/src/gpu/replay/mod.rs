//! Replay tests: records laid out as each supported driver version lays them out
//! ([`images`]), decoded with the table [`layout_for`] picks for that version, and applied to
//! a [`GpuObjects`]. Simulated: no driver runs; the images are the parameter blocks a driver
//! would leave in the caller's memory, so the figures below are what the decoder must get.

mod images;

use infermem_common::nvidia_fd::{CTL, DEVICE};

use self::images::{
    DRIVERS, Driver, Handles, Image, device_params, os_desc_params, rm_alloc_memory, rm_dup,
    rm_free, vid_heap_alloc, vid_heap_free, vid_heap_os_desc,
};
use super::{DeviceUsage, GpuObjects};
use crate::gpu::{
    UNKNOWN_DEVICE,
    decode::{NotDecoded, RmCall, decode},
    layout::{DriverVersion, Layout, layout_for},
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TGID: u32 = 4242;
const CLIENT: u32 = 0xc1d0_0007;
const DEVICE_HANDLE: u32 = 0xcaf0_0080;
/// `NV_ERR_NO_MEMORY`.
const NO_MEMORY: u32 = 0x51;
/// LOCATION (attr 26:25) = PCI.
const ATTR_PCI: u32 = 1 << 25;
/// `NVOS32_ALLOC_FLAGS_VIRTUAL`.
const FLAGS_VIRTUAL: u32 = 0x8_0000;
/// `NVOS32_ATTR2_USE_EGM`.
const ATTR2_EGM: u32 = 1 << 24;

fn h(parent: u32, handle: u32) -> Handles {
    Handles {
        client: CLIENT,
        parent,
        handle,
    }
}

/// A tracker and the layout of one driver version.
struct Replay {
    layout: &'static Layout,
    objects: GpuObjects,
}

impl Replay {
    fn new(driver: &Driver) -> Replay {
        let version = DriverVersion::parse(driver.version).unwrap();
        Replay {
            layout: layout_for(&version).unwrap(),
            objects: GpuObjects::new(),
        }
    }

    /// Decodes `image` as sent for `tgid` on `fd_kind` and applies it; the decoded call.
    fn send(&mut self, tgid: u32, fd_kind: u32, image: &Image) -> RmCall {
        let call = decode(self.layout, &image.record(tgid, fd_kind));
        self.objects.apply(tgid, fd_kind, &call);
        call
    }

    fn ctl(&mut self, image: &Image) -> RmCall {
        self.send(TGID, CTL, image)
    }

    /// A client, and device `device_id` under it.
    fn client_and_device(&mut self, driver: &Driver, device_id: u32) {
        let client = driver.nvos21(h(0, CLIENT), 0x41, 0);
        let call = self.ctl(&client);
        assert_eq!(
            call,
            RmCall::ClientAlloc {
                client: CLIENT,
                class: 0x41
            }
        );
        let device = driver.nvos64(h(CLIENT, DEVICE_HANDLE), 0x80, 0);
        self.ctl(&device.alloc_params(device_params(device_id)));
    }

    fn usage(&self) -> Vec<DeviceUsage> {
        self.objects.usage(TGID)
    }
}

fn usage(device: u32, vram_bytes: u64, host_pinned_bytes: u64) -> Vec<DeviceUsage> {
    vec![DeviceUsage {
        device,
        vram_bytes,
        host_pinned_bytes,
    }]
}

/// Every allocation path once, on device 1 of each driver version.
fn allocate_everything(r: &mut Replay, d: &Driver) {
    r.client_and_device(d, 1);
    r.ctl(&d.nvos21(h(DEVICE_HANDLE, 0x5d), 0x2080, 0));
    let vram21 = d.nvos21(h(DEVICE_HANDLE, 0x100), 0x40, 0);
    r.ctl(&vram21.alloc_params(d.memory_params(GIB)));
    let vram64 = d.nvos64(h(DEVICE_HANDLE, 0x101), 0x40, 0);
    r.ctl(&vram64.alloc_params(d.memory_params(512 * MIB)));
    let host64 = d.nvos64(h(DEVICE_HANDLE, 0x102), 0x3e, 0);
    r.ctl(&host64.alloc_params(d.memory_params(64 * MIB)));
    r.ctl(&vid_heap_alloc(h(DEVICE_HANDLE, 0x103), 0, 0, 0, 256 * MIB));
    r.ctl(&vid_heap_alloc(
        h(DEVICE_HANDLE, 0x104),
        0,
        ATTR_PCI,
        0,
        32 * MIB,
    ));
    r.ctl(&vid_heap_alloc(
        h(DEVICE_HANDLE, 0x105),
        FLAGS_VIRTUAL,
        0,
        0,
        8 * GIB,
    ));
    let sys = rm_alloc_memory(h(DEVICE_HANDLE, 0x106), 0x3e, 2 * MIB);
    r.send(TGID, DEVICE + 1, &sys);
    let os_desc = rm_alloc_memory(h(DEVICE_HANDLE, 0x107), 0x71, 4 * MIB);
    r.send(TGID, DEVICE + 1, &os_desc);
    let os_desc21 = d.nvos21(h(DEVICE_HANDLE, 0x108), 0x71, 0);
    r.ctl(&os_desc21.alloc_params(os_desc_params(MIB)));
    r.ctl(&vid_heap_os_desc(h(DEVICE_HANDLE, 0x109), 3 * MIB));
}

const VRAM_ALL: u64 = GIB + 512 * MIB + 256 * MIB;
const HOST_ALL: u64 = 64 * MIB + 32 * MIB + 2 * MIB + 4 * MIB + MIB + 3 * MIB;

#[test]
fn every_allocation_path_is_sized_exactly_in_every_version() {
    for d in &DRIVERS {
        let mut r = Replay::new(d);
        allocate_everything(&mut r, d);
        assert_eq!(r.usage(), usage(1, VRAM_ALL, HOST_ALL), "{}", d.version);
        assert_eq!(r.objects.device_totals(), usage(1, VRAM_ALL, HOST_ALL));
        let counters = r.objects.counters();
        assert_eq!(
            (counters.decoded, counters.refused),
            (13, 0),
            "{}",
            d.version
        );
        assert_eq!(counters.undecodable, 0, "{}", d.version);
        assert!(counters.unknown_classes.is_empty(), "{}", d.version);
    }
}

#[test]
fn frees_dups_and_refusals_in_every_version() {
    for d in &DRIVERS {
        let mut r = Replay::new(d);
        allocate_everything(&mut r, d);
        let refused = d.nvos64(h(DEVICE_HANDLE, 0x300), 0x40, NO_MEMORY);
        let call = r.ctl(&refused.alloc_params(d.memory_params(GIB)));
        assert!(
            matches!(
                call,
                RmCall::Refused {
                    status: NO_MEMORY,
                    ..
                }
            ),
            "{call:?}"
        );
        r.ctl(&rm_dup(h(DEVICE_HANDLE, 0x200), CLIENT, 0x100));
        assert_eq!(r.usage(), usage(1, VRAM_ALL, HOST_ALL), "{}", d.version);
        r.ctl(&vid_heap_free(h(DEVICE_HANDLE, 0x103)));
        r.ctl(&rm_free(h(DEVICE_HANDLE, 0x200), 0));
        r.ctl(&rm_free(h(DEVICE_HANDLE, 0x101), 0));
        r.ctl(&rm_free(h(DEVICE_HANDLE, 0x107), 0));
        let vram = VRAM_ALL - 256 * MIB - 512 * MIB;
        assert_eq!(
            r.usage(),
            usage(1, vram, HOST_ALL - 4 * MIB),
            "{}",
            d.version
        );
        r.ctl(&rm_free(h(DEVICE_HANDLE, 0x999), 0));
        r.ctl(&rm_free(h(DEVICE_HANDLE, 0x102), 0x57)); // refused: nothing changes
        assert_eq!(
            r.usage(),
            usage(1, vram, HOST_ALL - 4 * MIB),
            "{}",
            d.version
        );
        let c = r.objects.counters();
        assert_eq!(
            (c.refused, c.dups, c.unpaired_frees),
            (2, 1, 1),
            "{}",
            d.version
        );
    }
}

#[test]
fn freeing_the_device_frees_its_memory_and_the_client_everything() {
    for d in &DRIVERS {
        let mut r = Replay::new(d);
        allocate_everything(&mut r, d);
        r.ctl(&rm_free(h(CLIENT, DEVICE_HANDLE), 0));
        assert_eq!(r.usage(), vec![], "{}", d.version);
        let vram = d.nvos21(h(DEVICE_HANDLE, 0x100), 0x40, 0);
        r.ctl(&vram.alloc_params(d.memory_params(GIB))); // parent gone: device unknown
        assert_eq!(r.usage(), usage(UNKNOWN_DEVICE, GIB, 0), "{}", d.version);
        r.ctl(&rm_free(h(0, CLIENT), 0));
        assert_eq!(r.usage(), vec![], "{}", d.version);
        r.ctl(&rm_free(h(CLIENT, 0x100), 0));
        assert_eq!(r.objects.counters().unpaired_frees, 1, "{}", d.version);
    }
}

#[test]
fn a_process_exit_releases_its_clients_only() {
    let d = &DRIVERS[DRIVERS.len() - 1];
    let mut r = Replay::new(d);
    allocate_everything(&mut r, d);
    let other = d.nvos21(h(DEVICE_HANDLE, 0x100), 0x40, 0);
    r.send(7, CTL, &other.alloc_params(d.memory_params(GIB)));
    r.objects.process_exited(TGID);
    assert_eq!(r.usage(), vec![]);
    assert_eq!(r.objects.usage(7), usage(UNKNOWN_DEVICE, GIB, 0));
    assert_eq!(r.objects.device_totals(), usage(UNKNOWN_DEVICE, GIB, 0));
}

#[test]
fn egm_vid_heap_memory_is_an_unknown_class_where_the_driver_makes_it() {
    for d in &DRIVERS {
        let mut r = Replay::new(d);
        r.client_and_device(d, 0);
        r.ctl(&vid_heap_alloc(
            h(DEVICE_HANDLE, 0x110),
            0,
            0,
            ATTR2_EGM,
            GIB,
        ));
        let unknown = r.objects.counters().unknown_classes.get(&0x42).copied();
        if d.egm {
            assert_eq!((r.usage(), unknown), (vec![], Some(1)), "{}", d.version);
        } else {
            assert_eq!(
                (r.usage(), unknown),
                (usage(0, GIB, 0), None),
                "{}",
                d.version
            );
        }
    }
}

#[test]
fn unknown_and_unsizable_classes_are_counted_by_id() {
    for d in &DRIVERS {
        let mut r = Replay::new(d);
        r.client_and_device(d, 2);
        r.ctl(
            &d.nvos64(h(DEVICE_HANDLE, 0x120), 0xf8, 0)
                .alloc_params(vec![0; 64]),
        );
        r.ctl(&d.nvos21(h(DEVICE_HANDLE, 0x121), 0x1234, 0));
        r.ctl(&d.nvos21(h(DEVICE_HANDLE, 0x122), 0xc86f, 0)); // a channel: known, sizeless
        r.send(
            TGID,
            DEVICE + 2,
            &rm_alloc_memory(h(DEVICE_HANDLE, 0x123), 0x81, MIB),
        );
        let classes: Vec<_> = r
            .objects
            .counters()
            .unknown_classes
            .clone()
            .into_iter()
            .collect();
        assert_eq!(
            classes,
            [(0x81, 1), (0xf8, 1), (0x1234, 1)],
            "{}",
            d.version
        );
        assert_eq!(r.usage(), vec![], "{}", d.version);
    }
}

#[test]
fn alloc_memory_on_dev_nvidia_n_falls_back_to_n() {
    let d = &DRIVERS[4];
    let mut r = Replay::new(d);
    r.ctl(&d.nvos21(h(0, CLIENT), 0x41, 0));
    r.send(
        TGID,
        DEVICE + 3,
        &rm_alloc_memory(h(0xdead, 0x130), 0x3e, 8 * MIB),
    );
    r.ctl(
        &d.nvos21(h(0xdead, 0x131), 0x3e, 0)
            .alloc_params(d.memory_params(MIB)),
    );
    let expected = vec![
        DeviceUsage {
            device: 3,
            vram_bytes: 0,
            host_pinned_bytes: 8 * MIB,
        },
        DeviceUsage {
            device: UNKNOWN_DEVICE,
            vram_bytes: 0,
            host_pinned_bytes: MIB,
        },
    ];
    assert_eq!(r.usage(), expected);
}

#[test]
fn a_block_laid_out_for_another_version_is_not_misread() {
    let older = &DRIVERS[3]; // 530: NVOS64 is 40 bytes
    let newer = Replay::new(&DRIVERS[4]); // 535: 32 or 48
    let image = older.nvos64(h(DEVICE_HANDLE, 0x140), 0x40, 0);
    let call = decode(newer.layout, &image.record(TGID, CTL));
    assert!(
        matches!(
            call,
            RmCall::NotDecoded(NotDecoded::UnexpectedSize { size: 40, .. })
        ),
        "{call:?}"
    );
    // A 530 NVOS21 refused with status at 24 reads as refused with 530's table only.
    let refused = older.nvos21(h(DEVICE_HANDLE, 0x141), 0x40, NO_MEMORY);
    let call = decode(Replay::new(older).layout, &refused.record(TGID, CTL));
    assert!(
        matches!(
            call,
            RmCall::Refused {
                status: NO_MEMORY,
                ..
            }
        ),
        "{call:?}"
    );
}

#[test]
fn short_and_garbled_records_are_counted_not_applied() {
    let d = &DRIVERS[6];
    let mut r = Replay::new(d);
    r.client_and_device(d, 0);
    let vram = d.nvos64(h(DEVICE_HANDLE, 0x150), 0x40, 0);
    let mut short_alloc = vram
        .clone()
        .alloc_params(d.memory_params(GIB))
        .record(TGID, CTL);
    short_alloc.alloc_params_len = 70;
    let mut short_params = vram.alloc_params(d.memory_params(GIB)).record(TGID, CTL);
    short_params.params_len = 40;
    let mut huge_len = rm_free(h(DEVICE_HANDLE, 0x150), 0).record(TGID, CTL);
    huge_len.params_len = u32::MAX;
    let mut failed = rm_free(h(DEVICE_HANDLE, 0x150), 0).record(TGID, CTL);
    failed.ret = -22;
    let mut not_nvidia = rm_free(h(DEVICE_HANDLE, 0x150), 0).record(TGID, CTL);
    not_nvidia.cmd = 0xc010_4729;
    let mut wrong_size = rm_free(h(DEVICE_HANDLE, 0x150), 0).record(TGID, CTL);
    wrong_size.cmd = 0xc014_4629;
    let mut function = vid_heap_free(h(DEVICE_HANDLE, 0x150)).record(TGID, CTL);
    function.params[8..12].copy_from_slice(&14u32.to_ne_bytes());
    for record in [
        &short_alloc,
        &short_params,
        &failed,
        &not_nvidia,
        &wrong_size,
        &function,
    ] {
        let call = decode(r.layout, record);
        assert!(matches!(call, RmCall::NotDecoded(_)), "{call:?}");
        r.objects.apply(TGID, CTL, &call);
    }
    let call = decode(r.layout, &huge_len);
    assert!(
        matches!(call, RmCall::Free { handle: 0x150, .. }),
        "{call:?}"
    );
    assert_eq!(r.objects.counters().undecodable, 6);
    assert_eq!(r.usage(), vec![]);
}
