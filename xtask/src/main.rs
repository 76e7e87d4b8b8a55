//! `cargo xtask <task>`: developer tasks for infermem (see `cargo xtask help`).

mod bench;
mod cargo;
mod checks;
mod dashboards;
mod fuzz;
mod python;
mod service;
mod vm;

use anyhow::{Result, bail};

const HELP: &str = "\
usage: cargo xtask <task> [options]

tasks:
  bootstrap                 install the eBPF toolchain (nightly rust-src, matching bpf-linker)
  run [--release] [-- ARGS] build infermem and run it with ARGS (e.g. -- doctor)
  test [-- ARGS]            build everything and run the whole test suite (needs root: the
                            end-to-end tests load eBPF programs and create memory cgroups);
                            provisions the llama.cpp tests' Python venv (wheel cached)
  test --kernel <vmlinuz|debian12> [--cgroup v1|v2] [--timeout SECONDS]
                            run the kernel-facing tests (probes, inspect, OOM, fork storm,
                            cgroups; not llama.cpp) as root in QEMU (TCG) on that kernel, with
                            that memory cgroup version (default v2); `debian12` downloads Debian
                            12's current kernel package (cached in ~/.cache/infermem/kernels);
                            installs qemu-system-x86, busybox-static and cpio if missing
  check-dashboards          promtool check/test of dashboards/alerts.yml, the Grafana dashboard's
                            panels and targets, deploy/otel-collector.yaml against its JSON schema
                            (check-jsonschema, pinned, in a venv under target/); needs promtool
  install [--root DIR] [--release|--debug]
                            build infermem (release by default) and install it under DIR
                            (default /): usr/local/bin/infermem, the systemd unit, the default
                            config (an existing one is kept); on / also the `infermem` group
  check-service             systemd-analyze verify and security --offline of the unit (fails
                            above its exposure threshold), options that would hide /proc,
                            cgroups or GPUs; the Kubernetes DaemonSet against the API schemas
                            (kubernetes-validate, pinned, in a venv under target/)
  fuzz [--seconds N]        run the model file parsers' fuzz targets (cargo-fuzz, nightly) for
                            N seconds each (default 60) from the seeds in agent/fuzz/seeds
  bench predictor [--quick] [--hold SECONDS]
                            real ramps, a model and never-OOM workloads in 1 GiB memory cgroups
                            under one agent: lead time of `critical` before each real OOM kill,
                            ETA error, false criticals over 300 s (--quick: 60 s)
  bench footprint [--quick] [--seconds N]
                            the agent's CPU (% of a core) and RSS over N-s windows (default 60,
                            --quick 20): idle, with 500 idle processes, with 5 mapped models
  bench overhead [--mib N] [--iterations N] [--rounds N] [--llama-rounds N] [--tokens N]
                            time a fault-heavy workload with no tracing, with the agent and with
                            an equivalent bpftrace program; then llama.cpp's tokens/s with the
                            agent on and off (--llama-rounds 0 skips it)
  bench protect [--quick] [--seconds N]
                            a model server and llama.cpp sharing a memory cgroup with a growing
                            neighbour: throughput kept without infermem and with it enforcing a
                            policy, and who was OOM-killed (N s of pressure, default 40, --quick 20)
  (benchmarks need root and print PASS/MISS per target; see docs/benchmarks.md)
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((task, rest)) => (task.as_str(), rest),
        None => ("help", &[][..]),
    };
    match task {
        "bootstrap" => {
            let toolchain = xtask::toolchain::ensure()?;
            println!("bpf-linker ready in {}", toolchain.bin_dir.display());
            Ok(())
        }
        "run" => {
            let release = rest.first().is_some_and(|a| a == "--release");
            let forwarded = rest
                .iter()
                .skip_while(|a| *a != "--")
                .skip(1)
                .cloned()
                .collect::<Vec<_>>();
            cargo::run_infermem(release, &forwarded)
        }
        "test" if rest.iter().any(|a| a == "--kernel") => {
            if !cargo::is_root() {
                bail!("the VM runner installs packages with apt-get: run it as root");
            }
            vm::test(&vm::Options::parse(rest)?)
        }
        "test" => {
            let forwarded = rest
                .iter()
                .skip_while(|a| *a != "--")
                .skip(1)
                .cloned()
                .collect::<Vec<_>>();
            cargo::test(&forwarded)
        }
        "check-dashboards" => dashboards::check(),
        "install" => service::install(&service::InstallOptions::parse(rest)?),
        "check-service" => service::check(),
        "fuzz" => fuzz::fuzz(&fuzz::Options::parse(rest)?),
        "bench" => match rest.split_first() {
            Some((which, options)) => bench::run(which, options),
            None => bail!("which benchmark? available: {}\n{HELP}", bench::NAMES),
        },
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        other => bail!("unknown task {other:?}\n{HELP}"),
    }
}
