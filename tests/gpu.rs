//! GPU memory per process from the NVIDIA driver's RM ioctls, end to end, on hosts without a
//! GPU.
//!
//! What is simulated: the NVIDIA driver, and only it. A FUSE filesystem in this test process
//! (`infermem_tests::nvidia::FakeDriver`) answers the RM escapes as RM does for what the agent
//! reads: the parameter block comes back with RM's `status` written (`NV_OK`, or
//! `NV_ERR_NO_MEMORY` for the handle a test names) and a new client gets a handle. It keeps
//! no objects and allocates nothing. A test program (`workload nvidia-script`) binds its
//! files at `/dev/nvidiactl`, `/dev/nvidia0`, `/dev/nvidia1` and `/dev/nvidia-uvm` in a
//! private mount namespace and opens them there; each scripted step is one `ioctl`, its block
//! laid out for the driver version under test by the tests' own builders (not the agent's).
//!
//! What is real: the program's `openat` and `ioctl` syscalls, the kernel's copies of the
//! blocks in and out, the agent's eBPF probes at syscall entry and exit, its `/proc` scan,
//! its decoder and bookkeeping, and the clients' JSON. The agent is told the driver version
//! (`[gpu] driver_version`: no module is loaded), to accept the FUSE files by their path
//! (`fd_check = "path"`: they are not character devices of major 195), and not to read NVML.
//!
//! The figures are checked exactly: bytes allocated minus bytes freed, per device; dups,
//! virtual ranges and refused allocations count nothing; freeing a device or a client drops
//! what was under it; a process's exit drops all of its memory.

use std::time::{Duration, Instant};

use infermem_tests::{
    daemon::{Daemon, NOTICE_TIMEOUT, serial},
    nvidia::{
        Api, FIRST_CLIENT, FakeDriver, FakeNodes, Layout, NV_ERR_NO_MEMORY, Params, Script, Step,
        class,
    },
    require_root,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A class id no driver defines: the agent must count it as unknown.
const UNKNOWN_CLASS: u32 = 0xcafe;

/// Handles of the scripts (RM takes the caller's, except a client's).
const DEVICE_0: u32 = 0xd000;
const DEVICE_1: u32 = 0xd001;
const SUBDEVICE_0: u32 = 0x5d00;
const VRAM_NVOS21: u32 = 0x1000;
const VRAM_NVOS64: u32 = 0x1001;
const VRAM_DEVICE_1: u32 = 0x1100;
const SYSTEM_MEMORY: u32 = 0x1200;
const VID_HEAP: u32 = 0x1300;
const VID_HEAP_VIRTUAL: u32 = 0x1301;
const OS_DESCRIPTOR: u32 = 0x1400;
const DUPLICATE: u32 = 0x1500;
/// The stand-in driver refuses this one (`NV_ERR_NO_MEMORY`).
const REFUSED: u32 = 0x1600;
const UNKNOWN: u32 = 0x1700;

/// A device's figures in `inspect`: (device, vram_bytes_ioctl, host_pinned_bytes).
type DeviceFigures = (u64, u64, u64);

/// An agent decoding `version`'s layouts, taking the stand-in's files for NVIDIA nodes by
/// their path, without NVML (its figures would not be the stand-in's on a host with a GPU).
fn agent(name: &str, version: &str) -> Daemon {
    let gpu = format!("[gpu]\ndriver_version = \"{version}\"\nfd_check = \"path\"\nnvml = false\n");
    let agent = Daemon::start_with_sections(name, &gpu, &[]);
    // The syscall probes carry the NVIDIA fds and ioctls: without them nothing can be seen.
    let daemon = &agent.status()["daemon"];
    assert_eq!(daemon["ebpf"], true, "{daemon}");
    assert_eq!(
        daemon["probes_unavailable"],
        Value::Array(vec![]),
        "probes missing: {daemon}"
    );
    agent
}

/// The stand-in driver of `version`'s family, refusing [`REFUSED`].
fn stand_in(name: &str, version: &str) -> FakeNodes {
    FakeNodes::mount(
        name,
        FakeDriver::new(Layout::of_version(version), &[REFUSED]),
    )
}

fn client() -> Step {
    alloc(Api::Nvos21, 0, 0, 0, class::ROOT_CLIENT, Params::Empty)
}

fn alloc(api: Api, client: u32, parent: u32, handle: u32, class: u32, params: Params) -> Step {
    Step::Alloc {
        api,
        client,
        parent,
        handle,
        class,
        params,
    }
}

fn free(client: u32, parent: u32, handle: u32) -> Step {
    Step::Free {
        client,
        parent,
        handle,
    }
}

/// Polls `once` until it returns Some, for at most [`NOTICE_TIMEOUT`]; fails with the last
/// answer (`Err`) and the agent's log.
fn until<T>(agent: &Daemon, what: &str, mut once: impl FnMut() -> Result<T, Value>) -> T {
    let deadline = Instant::now() + NOTICE_TIMEOUT;
    loop {
        match once() {
            Ok(found) => return found,
            Err(last) if Instant::now() >= deadline => panic!(
                "{what}: not seen within {NOTICE_TIMEOUT:?}; last answer: {last}\nthe agent's \
                 log:\n{}",
                agent.log_tail()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// `inspect <pid> --json` through the agent: its `gpu` list.
fn inspect_gpu(agent: &Daemon, pid: u32) -> Value {
    let report = agent.json(&["inspect", &pid.to_string(), "--json", "--duration", "300ms"]);
    assert_eq!(report["pid"], pid, "{report}");
    report["gpu"].clone()
}

/// The per-device figures of a `gpu` list, devices holding nothing left out. Every entry
/// has an ioctl figure (the agent decodes) and no NVML figure (NVML is off).
fn figures(gpu: &Value) -> Vec<DeviceFigures> {
    let entries = gpu
        .as_array()
        .unwrap_or_else(|| panic!("gpu is not a list: {gpu}"));
    let mut figures: Vec<DeviceFigures> = entries
        .iter()
        .map(|e| {
            assert!(e["vram_bytes_nvml"].is_null(), "NVML is off: {e}");
            let number = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k}: {e}"));
            (
                number("device"),
                number("vram_bytes_ioctl"),
                number("host_pinned_bytes"),
            )
        })
        .filter(|&(_, vram, host)| vram != 0 || host != 0)
        .collect();
    figures.sort_unstable();
    figures
}

/// Waits until `inspect` shows exactly `expected` for `pid` (what the ring buffer carries is
/// read once a round); returns the `gpu` list.
fn wait_figures(agent: &Daemon, pid: u32, expected: &[DeviceFigures]) -> Value {
    until(agent, &format!("inspect {pid}: gpu {expected:?}"), || {
        let gpu = inspect_gpu(agent, pid);
        if figures(&gpu) == expected {
            Ok(gpu)
        } else {
            Err(gpu)
        }
    })
}

/// Waits until `status --json`'s `gpu` satisfies `accept`; returns it.
fn wait_status(agent: &Daemon, what: &str, accept: impl Fn(&Value) -> bool) -> Value {
    until(agent, what, || {
        let gpu = agent.status()["gpu"].clone();
        if accept(&gpu) { Ok(gpu) } else { Err(gpu) }
    })
}

/// The live objects of `class_id` that `status` lists as of an unknown class.
fn unknown_objects(gpu: &Value, class_id: u32) -> Option<u64> {
    gpu["unknown_classes"]
        .as_array()?
        .iter()
        .find(|c| c["class_id"] == class_id)
        .and_then(|c| c["objects"].as_u64())
}

/// The ioctl figure of `device` over all processes, in `status` (0 when it is not listed).
fn device_vram(gpu: &Value, device: u64) -> u64 {
    gpu["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["device"] == device))
        .map_or(0, |d| d["vram_bytes_ioctl"].as_u64().unwrap_or(0))
}

/// The stand-in alone (no agent): the program's ioctls reach it through the device paths of
/// its private `/dev` and come back with RM's answer; the host's `/dev` is left untouched and
/// `/proc` names the nodes by the paths the agent's scan looks for.
#[test]
fn the_stand_in_driver_answers_ioctls_at_the_device_paths_of_a_private_dev() {
    require_root();
    let fake = stand_in("gpu-stand-in", "535.54.03");
    let mut script = Script::start(&fake, "535.54.03");
    assert_eq!(
        script.ok(client()),
        FIRST_CLIENT,
        "RM makes the client's handle"
    );
    let vram = |handle| {
        let params = Params::Size(MIB);
        alloc(
            Api::Nvos64,
            FIRST_CLIENT,
            DEVICE_0,
            handle,
            class::MEMORY_LOCAL_USER,
            params,
        )
    };
    assert_eq!(script.ok(vram(VRAM_NVOS64)), VRAM_NVOS64);
    script.run(vram(REFUSED), NV_ERR_NO_MEMORY);

    let mut links: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", script.pid))
        .expect("the program's fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|p| p.to_str().map(str::to_owned))
        .filter(|p| p.starts_with("/dev/nvidia"))
        .collect();
    links.sort();
    assert_eq!(
        links,
        [
            "/dev/nvidia-uvm",
            "/dev/nvidia0",
            "/dev/nvidia1",
            "/dev/nvidiactl"
        ]
    );
    // The host's /dev has no stand-in file (a real node, on a host with a GPU, is a char
    // device).
    for node in infermem_tests::nvidia::NODES {
        let host = std::fs::metadata(format!("/dev/{node}"));
        let is_device = host
            .as_ref()
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()));
        assert!(
            host.is_err() || is_device,
            "/dev/{node} appeared on the host"
        );
    }
    assert!(script.finish().success());
}

/// The steps that allocate on a client's two devices, with the figures they make:
/// device 0: 64 MiB (NVOS21) + 32 MiB (NVOS64) + 4 MiB (vid heap) of VRAM, 8 MiB of system
/// memory and a 2 MiB OS descriptor; device 1: 16 MiB of VRAM. The 1 GiB virtual vid-heap
/// range counts nothing.
fn allocations(client: u32) -> (Vec<Step>, Vec<DeviceFigures>) {
    let memory = |api, parent, handle, class, mib: u64| {
        alloc(api, client, parent, handle, class, Params::Size(mib * MIB))
    };
    let heap = |handle, size, virtual_only| Step::VidHeapAlloc {
        client,
        parent: DEVICE_0,
        handle,
        size,
        virtual_only,
    };
    let steps = vec![
        alloc(
            Api::Nvos21,
            client,
            client,
            DEVICE_0,
            class::DEVICE,
            Params::Device(0),
        ),
        alloc(
            Api::Nvos21,
            client,
            DEVICE_0,
            SUBDEVICE_0,
            class::SUBDEVICE,
            Params::Empty,
        ),
        alloc(
            Api::Nvos64,
            client,
            client,
            DEVICE_1,
            class::DEVICE,
            Params::Device(1),
        ),
        memory(
            Api::Nvos21,
            DEVICE_0,
            VRAM_NVOS21,
            class::MEMORY_LOCAL_USER,
            64,
        ),
        memory(
            Api::Nvos64,
            DEVICE_0,
            VRAM_NVOS64,
            class::MEMORY_LOCAL_USER,
            32,
        ),
        memory(
            Api::Nvos64,
            DEVICE_1,
            VRAM_DEVICE_1,
            class::MEMORY_LOCAL_USER,
            16,
        ),
        memory(
            Api::Nvos21,
            DEVICE_0,
            SYSTEM_MEMORY,
            class::MEMORY_SYSTEM,
            8,
        ),
        heap(VID_HEAP, 4 * MIB, false),
        heap(VID_HEAP_VIRTUAL, 1 << 30, true),
        Step::AllocMemory {
            device: 0,
            client,
            parent: DEVICE_0,
            handle: OS_DESCRIPTOR,
            class: class::OS_DESCRIPTOR,
            size: 2 * MIB,
        },
    ];
    (steps, vec![(0, 100 * MIB, 10 * MIB), (1, 16 * MIB, 0)])
}

/// A dup, a refused allocation and an object of an unknown class: none changes the figures;
/// `status` counts the refusal and the unknown class (the refusal is the later record, so
/// once it is counted the dup was read too).
fn nothing_counted(agent: &Daemon, script: &mut Script, client: u32, before: &[DeviceFigures]) {
    let dup = Step::Dup {
        client,
        parent: DEVICE_0,
        handle: DUPLICATE,
        src_client: client,
        src_handle: VRAM_NVOS21,
    };
    script.ok(dup);
    let unknown = alloc(
        Api::Nvos64,
        client,
        DEVICE_0,
        UNKNOWN,
        UNKNOWN_CLASS,
        Params::Empty,
    );
    script.ok(unknown);
    let params = Params::Size(128 * MIB);
    let refused = alloc(
        Api::Nvos64,
        client,
        DEVICE_0,
        REFUSED,
        class::MEMORY_LOCAL_USER,
        params,
    );
    script.run(refused, NV_ERR_NO_MEMORY);
    let gpu = wait_status(agent, "one refusal and one unknown class", |g| {
        g["ioctls_refused"].as_u64() == Some(1) && unknown_objects(g, UNKNOWN_CLASS).is_some()
    });
    assert_eq!(unknown_objects(&gpu, UNKNOWN_CLASS), Some(1), "{gpu}");
    assert_eq!(figures(&inspect_gpu(agent, script.pid)), before);
}

/// Frees: the dup (nothing), the NVOS64 VRAM (-32 MiB), the vid-heap block (-4 MiB); then
/// device 1 (its 16 MiB with it); then the client (everything).
fn frees(agent: &Daemon, script: &mut Script, client: u32) {
    script.ok(free(client, DEVICE_0, DUPLICATE));
    script.ok(free(client, DEVICE_0, VRAM_NVOS64));
    let heap_free = Step::VidHeapFree {
        client,
        parent: DEVICE_0,
        handle: VID_HEAP,
    };
    script.ok(heap_free);
    let device_0 = (0, 64 * MIB, 10 * MIB);
    wait_figures(agent, script.pid, &[device_0, (1, 16 * MIB, 0)]);
    script.ok(free(client, client, DEVICE_1));
    wait_figures(agent, script.pid, &[device_0]);
    // hObjectOld == hRoot: the whole client.
    script.ok(free(client, client, client));
    let gpu = wait_figures(agent, script.pid, &[]);
    assert_eq!(
        gpu,
        Value::Array(vec![]),
        "a process holding nothing lists nothing"
    );
}

/// Device 0 under `client`, and `bytes` of video memory on it as `handle`, through `api`.
fn device_with_vram(script: &mut Script, api: Api, client: u32, handle: u32, bytes: u64) {
    let device = alloc(
        api,
        client,
        client,
        DEVICE_0,
        class::DEVICE,
        Params::Device(0),
    );
    script.ok(device);
    let class = class::MEMORY_LOCAL_USER;
    script.ok(alloc(
        api,
        client,
        DEVICE_0,
        handle,
        class,
        Params::Size(bytes),
    ));
}

/// A second client of 8 MiB, then the program's exit: the agent drops its memory with the
/// process (the driver frees a closed fd's clients without an ioctl).
fn exit_releases(agent: &Daemon, mut script: Script) {
    let client = script.ok(client());
    assert_eq!(client, FIRST_CLIENT + 1, "the stand-in's second client");
    device_with_vram(&mut script, Api::Nvos21, client, VRAM_NVOS21, 8 * MIB);
    wait_figures(agent, script.pid, &[(0, 8 * MIB, 0)]);
    let gpu = wait_status(agent, "device 0 at 8 MiB", |g| device_vram(g, 0) == 8 * MIB);
    assert_eq!(gpu["state"], "tracking", "{gpu}");
    assert!(script.finish().success());
    wait_status(agent, "device 0 empty after the exit", |g| {
        device_vram(g, 0) == 0
    });
}

/// The whole script on driver `version`, the program started after the agent (its fds
/// learned from `openat`).
fn script_on(version: &str) {
    require_root();
    let _serial = serial();
    let name = format!("gpu-{}", version.replace('.', "-"));
    let fake = stand_in(&name, version);
    let agent = agent(&name, version);
    let mut script = Script::start(&fake, version);
    let client = script.ok(client());
    assert_eq!(client, FIRST_CLIENT);
    let (steps, expected) = allocations(client);
    for step in steps {
        script.ok(step);
    }
    let gpu = wait_figures(&agent, script.pid, &expected);
    for entry in gpu.as_array().expect("a list") {
        assert_eq!(
            entry["ioctl_partial"], false,
            "opened after the start: {entry}"
        );
    }
    let status = agent.status()["gpu"].clone();
    assert_eq!(status["state"], "tracking", "{status}");
    assert_eq!(status["driver_version"], version, "{status}");
    assert_eq!(status["ioctls_refused"], 0, "{status}");
    nothing_counted(&agent, &mut script, client, &expected);
    frees(&agent, &mut script, client);
    exit_releases(&agent, script);
}

/// 515: NVOS21 status at 24; NVOS64 of 40 bytes, status at 32.
#[test]
fn driver_515_figures_are_exact() {
    script_on("515.43.04");
}

/// 525: NVOS64 of 40 bytes with flags at 32, status at 36.
#[test]
fn driver_525_figures_are_exact() {
    script_on("525.60.13");
}

/// 535: NVOS21 with paramsSize, status at 28; NVOS64 of 48 bytes, status at 40.
#[test]
fn driver_535_figures_are_exact() {
    script_on("535.54.03");
}

/// A later driver of the 535 layout.
#[test]
fn driver_570_figures_are_exact() {
    script_on("570.86.15");
}

/// The program opened the nodes before the agent started: the agent finds its fds in
/// `/proc` (by path), decodes what it does afterwards exactly, and says the figures may miss
/// what came before.
#[test]
fn fds_opened_before_the_agent_started_are_found_in_proc() {
    require_root();
    let _serial = serial();
    let version = "535.54.03";
    let fake = stand_in("gpu-before", version);
    let mut script = Script::start(&fake, version);
    let agent = agent("gpu-before", version);
    let client = script.ok(client());
    device_with_vram(&mut script, Api::Nvos64, client, VRAM_NVOS64, 24 * MIB);
    let pinned = Step::AllocMemory {
        device: 0,
        client,
        parent: DEVICE_0,
        handle: OS_DESCRIPTOR,
        class: class::OS_DESCRIPTOR,
        size: 4 * MIB,
    };
    script.ok(pinned);
    let gpu = wait_figures(&agent, script.pid, &[(0, 24 * MIB, 4 * MIB)]);
    assert_eq!(
        gpu[0]["ioctl_partial"], true,
        "opened before the start: {gpu}"
    );
    script.ok(free(client, DEVICE_0, VRAM_NVOS64));
    wait_figures(&agent, script.pid, &[(0, 0, 4 * MIB)]);
    script.ok(free(client, client, DEVICE_0));
    wait_figures(&agent, script.pid, &[]);
    assert!(script.finish().success());
}

/// A driver version with no layout table is reported, not guessed: the agent says which and
/// why, and decodes nothing (a refused guess would be worse than no figure).
#[test]
fn an_unknown_driver_version_is_reported_and_nothing_is_decoded() {
    require_root();
    let _serial = serial();
    for (version, why) in [("470.82.01", "older than"), ("610.10.02", "newer than")] {
        let gpu =
            format!("[gpu]\ndriver_version = \"{version}\"\nfd_check = \"path\"\nnvml = false\n");
        let agent = Daemon::start_with_sections("gpu-unknown", &gpu, &[]);
        let status = &agent.status()["gpu"];
        assert_eq!(status["state"], "unknown_driver", "{status}");
        assert_eq!(status["driver_version"], version, "{status}");
        let message = status["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(why) && message.contains("not decoded"),
            "{status}"
        );
        assert_eq!(status["layout"], "", "{status}");
    }
}

/// The default configuration on this host: without the NVIDIA driver (CI) the state is
/// `no_gpu`, a normal state, with NVML's absence said plainly; with one, its version is read
/// from the module.
#[test]
fn the_driver_state_is_reported_from_the_loaded_module() {
    require_root();
    let _serial = serial();
    let agent = Daemon::start_with_sections("gpu-default", "", &[]);
    let status = &agent.status()["gpu"];
    let module = std::fs::read_to_string("/sys/module/nvidia/version").ok();
    let Some(version) = module else {
        assert_eq!(status["state"], "no_gpu", "{status}");
        let message = status["message"].as_str().unwrap_or_default();
        assert!(message.contains("no NVIDIA driver"), "{status}");
        let nvml = status["nvml_error"].as_str().unwrap_or_default();
        assert!(nvml.contains("libnvidia-ml"), "{status}");
        assert_eq!(status["devices"], Value::Array(vec![]), "{status}");
        return;
    };
    assert_eq!(status["driver_version"], version.trim(), "{status}");
    let state = status["state"].as_str().unwrap_or_default();
    assert!(["tracking", "unknown_driver"].contains(&state), "{status}");
}
