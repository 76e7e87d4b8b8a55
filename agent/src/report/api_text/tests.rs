use super::*;
use crate::api::proto::ProcessGpu;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn elevated() -> Assessment {
    Assessment {
        level: "elevated".into(),
        eta_seconds: Some(190.2),
        eta_low_seconds: Some(120.0),
        eta_high_seconds: Some(300.0),
        domain: Some("/user.slice".into()),
        victim_pid: Some(4321),
        thrashing: true,
        reasons: vec!["rss grows 10 MiB/s\x1b[2J".into(), "second".into()],
    }
}

fn workload() -> Workload {
    Workload {
        pid: 4321,
        comm: "llama-server".into(),
        runtime: "llama-cpp".into(),
        model: "/models/qwen\x1b[2J.gguf".into(),
        weights_bytes: 4 * GIB,
        weights_resident_bytes: 3 * GIB,
        kv_bytes_max: Some(512 * MIB),
        rss_bytes: 5 * GIB,
        risk: Some(elevated()),
        ..Default::default()
    }
}

#[test]
fn ps_is_a_table_of_workloads() {
    let reply = PsReply {
        workloads: vec![workload()],
        daemon: None,
    };
    let text = render_ps(&reply);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("PID   RUNTIME    MODEL"), "{text}");
    let row = lines[1];
    assert!(
        row.starts_with("4321  llama-cpp  qwen\\x1b[2J.gguf"),
        "{text}"
    );
    assert!(!row.contains("/models"), "{text}");
    for cell in [
        "3.00 GiB/4.00 GiB",
        "?/512 MiB",
        "5.00 GiB",
        "elevated",
        "3m10s",
    ] {
        assert!(row.contains(cell), "{cell}: {text}");
    }
    for column in ["MODEL", "WEIGHTS", "KV", "RSS", "LEVEL", "ETA"] {
        let at = lines[0].find(column).unwrap();
        assert_eq!(&row[at - 2..at], "  ", "{column} is aligned: {text}");
        assert_ne!(&row[at..=at], " ", "{column} is aligned: {text}");
    }
}

#[test]
fn ps_without_workloads_says_so_and_unknowns_are_marked() {
    let empty = PsReply::default();
    assert_eq!(render_ps(&empty), "no AI workloads are tracked\n");
    let bare = PsReply {
        workloads: vec![Workload {
            pid: 1,
            runtime: "unknown".into(),
            ..Default::default()
        }],
        daemon: None,
    };
    let row = render_ps(&bare).lines().nth(1).unwrap().to_owned();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        ["1", "unknown", "-", "-", "?/?", "0", "B", "-", "?", "-"]
    );
}

fn on_gpu(device: u32, ioctl: Option<u64>, nvml: Option<u64>) -> ProcessGpu {
    ProcessGpu {
        device,
        vram_bytes_ioctl: ioctl,
        vram_bytes_nvml: nvml,
        host_pinned_bytes: 64 * MIB,
        ioctl_partial: false,
    }
}

#[test]
fn ps_shows_gpu_memory_summed_over_devices_ioctls_first() {
    let gpu = vec![
        on_gpu(0, Some(6 * GIB), Some(7 * GIB)),
        on_gpu(1, None, Some(GIB)),
        on_gpu(2, None, None),
    ];
    let w = Workload { gpu, ..workload() };
    let exact = Vram {
        bytes: 7 * GIB,
        at_least: false,
    };
    assert_eq!(workload_vram(&w), Some(exact), "6 GiB ioctl + 1 GiB NVML");
    let reply = PsReply {
        workloads: vec![w],
        daemon: None,
    };
    let text = render_ps(&reply);
    let lines: Vec<&str> = text.lines().collect();
    let at = lines[0].find("GPU").unwrap();
    assert!(lines[1][at..].starts_with("7.00 GiB  elevated"), "{text}");
    assert_eq!(lines[0].find("LEVEL"), lines[1].find("elevated"), "{text}");
    let nothing = Workload {
        gpu: vec![on_gpu(0, None, None)],
        ..workload()
    };
    assert_eq!(workload_vram(&nothing), None);
    assert_eq!(workload_vram(&workload()), None);
}

#[test]
fn a_partial_ioctl_figure_is_a_lower_bound() {
    let seen_late = ProcessGpu {
        ioctl_partial: true,
        ..on_gpu(0, Some(GIB), Some(2 * GIB))
    };
    let nvml_only = ProcessGpu {
        ioctl_partial: true,
        ..on_gpu(1, None, Some(GIB))
    };
    let w = |gpu| Workload { gpu, ..workload() };
    let vram = workload_vram(&w(vec![seen_late, on_gpu(1, None, Some(GIB))])).unwrap();
    assert_eq!(vram.to_string(), "≥2.00 GiB");
    let vram = workload_vram(&w(vec![nvml_only])).unwrap();
    assert_eq!(vram.to_string(), "1.00 GiB", "NVML sees it all");
}

#[test]
fn etas_read_like_durations() {
    assert_eq!(format_eta(0.2), "<1s");
    assert_eq!(format_eta(42.4), "42s");
    assert_eq!(format_eta(190.0), "3m10s");
    assert_eq!(format_eta(305.0), "5m05s");
    assert_eq!(format_eta(7500.0), "2h05m");
    assert_eq!(format_eta(f64::NAN), "-");
    assert_eq!(format_eta(-1.0), "-");
}

#[test]
fn status_shows_host_cgroups_kills_and_agent() {
    let reply = StatusReply {
        host: Some(HostStatus {
            mem_total_bytes: 64 * GIB,
            mem_available_bytes: 40 * GIB,
            mem_free_bytes: 30 * GIB,
            swap_total_bytes: 8 * GIB,
            swap_free_bytes: 8 * GIB,
            model_file_bytes: 3 * GIB,
            psi_some_avg10: Some(1.5),
            psi_full_avg10: Some(0.0),
            limit_bytes: 60 * GIB,
            used_bytes: 20 * GIB,
            risk: Some(Assessment {
                level: "ok".into(),
                ..Default::default()
            }),
        }),
        cgroups: vec![CgroupStatus {
            path: "/system.slice/llama\n.service".into(),
            version: "v2".into(),
            usage_bytes: GIB,
            limit_bytes: Some(4 * GIB),
            effective_limit_bytes: Some(2 * GIB),
            oom_kills: 1,
            processes: 2,
            risk: Some(elevated()),
            ..Default::default()
        }],
        oom_kills: vec![OomKill {
            ts_unix: 1_700_000_000.0,
            pid: 99,
            comm: "evil\x1b]0;x\x07".into(),
            memcg: "/system.slice/llama.service".into(),
            rss_anon_bytes: Some(GIB),
            rss_file_bytes: None,
            uid: Some(1000),
        }],
        daemon: Some(DaemonInfo {
            pid: 12,
            version: "0.1.0".into(),
            ebpf: false,
            ebpf_reason: "no BTF".into(),
            mode: "daemon".into(),
            processes: 300,
            probes_unavailable: vec!["oom/mark_victim: missing".into()],
            ..Default::default()
        }),
        gpu: None,
    };
    let text = render_status(&reply);
    for part in [
        "host      memory 64.0 GiB total, 40.0 GiB available, 30.0 GiB free; used 20.0 GiB of 60.0 GiB it can hold",
        "swap 8.00 GiB total, 8.00 GiB free; model files 3.00 GiB resident; pressure some 1.50% full 0.00% (avg10)",
        "risk ok\n",
        "  /system.slice/llama\\n.service (v2): usage 1.00 GiB of 4.00 GiB (effective 2.00 GiB); 2 processes; oom kills 1",
        "risk elevated, OOM in 3m10s (2m00s..5m00s) in /user.slice, victim pid 4321, model weights thrashing\n",
        "rss grows 10 MiB/s\\x1b[2J\n",
        "pid 99 (evil\\x1b]0;x\\x07) in /system.slice/llama.service: anon 1.00 GiB, file ?, uid 1000",
        "agent     pid 12, version 0.1.0, mode daemon, eBPF off (no BTF), 300 processes tracked",
        "probe unavailable: oom/mark_victim: missing",
    ] {
        assert!(text.contains(part), "{part:?} in\n{text}");
    }
    assert!(!text.contains('\x1b'), "{text}");
    let sections: Vec<usize> = ["host ", "cgroups", "oom kills", "agent "]
        .iter()
        .map(|s| text.find(s).unwrap())
        .collect();
    assert!(sections.is_sorted(), "{text}");
}

fn tracking() -> GpuStatus {
    GpuStatus {
        state: "tracking".into(),
        message: "RM ioctls decoded\x1b[2J".into(),
        driver_version: "550.54.14".into(),
        layout: "r535 (checked against 535.104.05, 550.54.14)".into(),
        devices: vec![GpuDevice {
            device: 0,
            name: "NVIDIA H200".into(),
            uuid: "GPU-1234".into(),
            total_bytes: Some(140 * GIB),
            used_bytes: Some(10 * GIB),
            free_bytes: Some(130 * GIB),
            utilization_percent: Some(37),
            vram_bytes_ioctl: 9 * GIB,
            vram_bytes_nvml_processes: Some(9 * GIB + 512 * MIB),
            nvml_minus_ioctl_bytes: Some(1 << 30),
        }],
        ioctls_decoded: 1234,
        ioctls_refused: 2,
        ringbuf_drops: 0,
        unknown_classes: vec![UnknownClass {
            class_id: 0xc86f,
            objects: 3,
        }],
        nvml_error: String::new(),
        ioctls_undecodable: 1,
    }
}

#[test]
fn status_shows_the_gpus_the_driver_and_the_probes() {
    let reply = StatusReply {
        gpu: Some(tracking()),
        daemon: Some(DaemonInfo::default()),
        ..Default::default()
    };
    let text = render_status(&reply);
    let gpu: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("gpu "))
        .take_while(|l| !l.starts_with("agent "))
        .collect();
    assert_eq!(
        gpu,
        [
            "gpu       tracking: RM ioctls decoded\\x1b[2J",
            "          driver 550.54.14, layout r535 (checked against 535.104.05, 550.54.14)",
            "          ioctls 1234 decoded, 2 refused by RM, 1 undecodable",
            "          unknown classes (not sized): 0x0000c86f (3 objects)",
            "  gpu 0 NVIDIA H200 (GPU-1234): memory 140 GiB total, 10.0 GiB used, 130 GiB free; \
             utilization 37%",
            "          ioctls 9.00 GiB live; NVML per process 9.50 GiB; NVML used - ioctls +1.00 GiB",
        ],
        "{text}"
    );
    assert!(text.find("oom kills") < text.find("gpu "), "{text}");
}

#[test]
fn status_says_when_there_is_no_gpu_or_no_nvml() {
    let none = GpuStatus {
        state: "no_gpu".into(),
        message: "no NVIDIA GPU (no driver loaded)".into(),
        ..Default::default()
    };
    let text = render_status(&StatusReply {
        gpu: Some(none),
        ..Default::default()
    });
    assert!(
        text.ends_with("gpu       no_gpu: no NVIDIA GPU (no driver loaded)\n"),
        "{text}"
    );
    let mut blind = tracking();
    blind.nvml_error = "libnvidia-ml not found".into();
    blind.ioctls_refused = 0;
    blind.ioctls_undecodable = 0;
    blind.ringbuf_drops = 5;
    blind.unknown_classes.clear();
    let device = &mut blind.devices[0];
    (device.total_bytes, device.used_bytes, device.free_bytes) = (None, None, None);
    device.utilization_percent = None;
    device.vram_bytes_nvml_processes = None;
    device.nvml_minus_ioctl_bytes = Some(-(512 * MIB as i64));
    let text = render_status(&StatusReply {
        gpu: Some(blind),
        ..Default::default()
    });
    for part in [
        "          ioctls 1234 decoded, 5 dropped (figures incomplete)\n",
        "          NVML not used: libnvidia-ml not found\n",
        "  gpu 0 NVIDIA H200 (GPU-1234): memory unknown to NVML\n",
        "          ioctls 9.00 GiB live; NVML used - ioctls -512 MiB\n",
    ] {
        assert!(text.contains(part), "{part:?} in\n{text}");
    }
    assert!(!text.contains("unknown classes"), "{text}");
}

#[test]
fn an_empty_status_says_what_is_missing() {
    let text = render_status(&StatusReply::default());
    assert_eq!(
        text,
        "host      unknown\ncgroups   none holds a tracked process\n\
         oom kills none since the agent started\n"
    );
}

fn update() -> WatchUpdate {
    WatchUpdate {
        ts: 1_700_000_000.5,
        target: "pid 4321".into(),
        risk: Some(elevated()),
        rss_bytes: Some(5 * GIB),
        limit_bytes: Some(8 * GIB),
        ended: false,
        end_reason: String::new(),
    }
}

#[test]
fn a_watch_line_has_time_target_risk_and_memory() {
    let line = render_watch_line(&update());
    let (time, rest) = line.split_at(8);
    assert!(
        time.bytes().enumerate().all(|(i, b)| if i == 2 || i == 5 {
            b == b':'
        } else {
            b.is_ascii_digit()
        }),
        "{line}"
    );
    assert_eq!(
        rest,
        "  pid 4321  elevated  eta 3m10s   rss 5.00 GiB/8.00 GiB  thrashing  \
         rss grows 10 MiB/s\\x1b[2J"
    );
    let last = WatchUpdate {
        risk: None,
        rss_bytes: None,
        limit_bytes: None,
        ended: true,
        end_reason: "oom-killed".into(),
        ..update()
    };
    assert!(
        render_watch_line(&last)
            .ends_with("  pid 4321  ?         eta -       rss ?/-  ended: oom-killed"),
        "{}",
        render_watch_line(&last)
    );
}

#[test]
fn watch_json_lines_have_a_fixed_shape() {
    assert_eq!(
        watch_json_line(&update()),
        r#"{"ts":1700000000.5,"target":"pid 4321","level":"elevated","eta_seconds":190.2,"domain":"/user.slice","victim_pid":4321,"thrashing":true,"reasons":["rss grows 10 MiB/s\u001b[2J","second"],"rss_bytes":5368709120,"limit_bytes":8589934592}"#
    );
    let last = WatchUpdate {
        target: "host".into(),
        risk: None,
        rss_bytes: None,
        limit_bytes: None,
        ended: true,
        end_reason: "exited".into(),
        ..update()
    };
    assert_eq!(
        watch_json_line(&last),
        r#"{"ts":1700000000.5,"target":"host","level":"unknown","eta_seconds":null,"domain":null,"victim_pid":null,"thrashing":false,"reasons":[],"rss_bytes":null,"limit_bytes":null,"ended":true,"end_reason":"exited"}"#
    );
}
