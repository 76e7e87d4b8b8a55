use super::*;

const MIB: u64 = 1 << 20;

/// 16 layers of 64 MiB, 32 MiB of embeddings and 32 MiB of output head; f16 KV of 8 KiB per
/// token.
fn profile() -> ModelProfile {
    ModelProfile {
        n_layer: Some(16),
        n_ctx_train: Some(8192),
        n_embd: Some(512),
        n_ff: Some(1024),
        n_head: Some(8),
        n_head_kv: vec![2; 16],
        head_dim_k: Some(64),
        head_dim_v: Some(64),
        n_vocab: Some(1000),
        layer_bytes: vec![64 * MIB; 16],
        token_embd_bytes: 32 * MIB,
        output_bytes: 32 * MIB,
        weight_bytes: 16 * 64 * MIB + 64 * MIB,
        ..Default::default()
    }
}

fn request(strategy: Strategy, ram: u64, vram: u64) -> PlanRequest {
    PlanRequest {
        model: PathBuf::from("model.gguf"),
        ctx: Some(4096),
        parallel: 1,
        cache_type: GgmlType::F16,
        flash_attn: true,
        ram_bytes: ram,
        vram_bytes: vram,
        strategy,
        cpu_backend: None,
    }
}

fn plan_of(strategy: Strategy, ram: u64, vram: u64) -> PlanReport {
    plan_profile(&request(strategy, ram, vram), ModelFormat::Gguf, profile()).unwrap()
}

#[test]
fn without_a_gpu_everything_stays_in_ram() {
    let p = plan_of(Strategy::MaxPerformance, 8 << 30, 0);
    assert_eq!((p.n_gpu_layers, p.n_ctx, p.fits), (0, 4096, true));
    assert_eq!(p.kv_bytes_per_token, 8192);
    assert_eq!(p.footprint.kv_cpu_bytes, 4096 * 8192);
    assert_eq!(p.footprint.vram_bytes, 0);
    assert_eq!(p.footprint.weights_cpu_bytes, profile().weight_bytes);
    assert_eq!(p.max_ctx, Some(8192), "bounded by the trained context");
}

#[test]
fn a_large_gpu_takes_every_layer_and_a_small_one_some() {
    let all = plan_of(Strategy::MaxPerformance, 8 << 30, 8 << 30);
    assert_eq!(all.n_gpu_layers, 17, "16 layers and the output head");
    assert_eq!(all.footprint.weights_gpu_bytes, 16 * 64 * MIB + 32 * MIB);
    let some = plan_of(Strategy::MaxPerformance, 8 << 30, 600 * MIB);
    assert!(
        some.n_gpu_layers > 0 && some.n_gpu_layers < 16,
        "{}",
        some.n_gpu_layers
    );
    assert!(some.footprint.vram_bytes <= 600 * MIB);
    let balanced = plan_of(Strategy::Balanced, 8 << 30, 600 * MIB);
    assert!(
        balanced.n_gpu_layers < some.n_gpu_layers,
        "balanced keeps headroom"
    );
    assert!(balanced.footprint.vram_bytes <= 540 * MIB);
}

#[test]
fn fit_vram_shrinks_the_context_and_max_context_finds_the_longest() {
    // All weights on the GPU are 1056 MiB; 4096 tokens need 32 MiB of KV and ~16 MiB of
    // compute buffers more.
    let fit = plan_of(Strategy::FitVram, 8 << 30, 1056 * MIB + 20 * MIB);
    assert_eq!(fit.n_gpu_layers, 17);
    assert!(
        fit.fits && fit.n_ctx < 4096 && fit.n_ctx >= 256,
        "{}",
        fit.n_ctx
    );
    let none = plan_of(Strategy::FitVram, 8 << 30, 100 * MIB);
    assert!(!none.fits);
    let longest = plan_of(Strategy::MaxContext, 1150 * MIB, 0);
    assert_eq!(longest.n_gpu_layers, 0);
    let f = longest.footprint;
    assert!(
        f.ram_bytes <= 1150 * MIB && longest.n_ctx < 8192,
        "{}",
        longest.n_ctx
    );
    assert_eq!(Some(longest.n_ctx), longest.max_ctx);
    let more = memory::footprint(
        &profile(),
        &KvModel::new(&profile(), GgmlType::F16, GgmlType::F16, true).unwrap(),
        &Placement {
            n_gpu_layers: 0,
            shape: ContextShape::with_ctx(longest.n_ctx + 256),
            type_k: GgmlType::F16,
            type_v: GgmlType::F16,
            flash_attn: true,
            cpu: None,
        },
    );
    assert!(more.ram_bytes > 1150 * MIB, "256 more tokens would not fit");
}

/// A device NVML reads with `free` of 80 GiB free.
fn nvml_device(index: u32, minor: Option<u32>, free: u64) -> crate::gpu::nvml::NvmlDevice {
    crate::gpu::nvml::NvmlDevice {
        index,
        minor,
        name: format!("NVIDIA H100 {index}"),
        uuid: format!("GPU-{index}"),
        total_bytes: 80 << 30,
        used_bytes: (80 << 30) - free,
        free_bytes: free,
        utilization_percent: None,
        processes: Vec::new(),
    }
}

#[test]
fn the_vram_budget_is_the_most_free_gpu() {
    let one = NvmlSnapshot {
        devices: vec![nvml_device(0, Some(0), 70 << 30)],
        ..NvmlSnapshot::default()
    };
    assert_eq!(
        vram_budget(&one),
        Ok((70 << 30, "GPU 0 (NVIDIA H100 0)".to_owned()))
    );
    let two = NvmlSnapshot {
        devices: vec![
            nvml_device(0, Some(1), 10 << 30),
            nvml_device(1, Some(0), 60 << 30),
        ],
        device_errors: vec![(2, crate::gpu::nvml::NvmlError::DriverNotLoaded)],
        ..NvmlSnapshot::default()
    };
    assert_eq!(
        vram_budget(&two),
        Ok((
            60 << 30,
            "GPU 0 (NVIDIA H100 1), the most free of 2 GPUs; NVML device 2: libnvidia-ml is \
             installed but the NVIDIA kernel driver is not loaded"
                .to_owned()
        ))
    );
}

#[test]
fn no_vram_budget_without_a_readable_gpu() {
    assert_eq!(
        vram_budget(&NvmlSnapshot::default()),
        Err("NVML lists no GPU".to_owned())
    );
    let lost = NvmlSnapshot {
        device_errors: vec![(
            0,
            crate::gpu::nvml::NvmlError::NoPermission("nvmlDeviceGetName"),
        )],
        ..NvmlSnapshot::default()
    };
    assert_eq!(
        vram_budget(&lost),
        Err(
            "NVML device 0: no permission to query the NVIDIA driver through NVML \
             (nvmlDeviceGetName)"
                .to_owned()
        )
    );
}

/// Real: on this host, `auto` fails exactly as NVML fails to open (no NVIDIA GPU or driver
/// in CI), with NVML's reason.
#[test]
fn available_vram_says_why_there_is_none() {
    match Nvml::open() {
        Err(e) => assert_eq!(available_vram(), Err(e.to_string())),
        Ok(nvml) => assert_eq!(
            available_vram().is_ok(),
            !nvml
                .snapshot()
                .expect("an NVML snapshot")
                .devices
                .is_empty()
        ),
    }
}
