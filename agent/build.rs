//! Builds the eBPF probes (`ebpf/infermem-ebpf`) into `$OUT_DIR/infermem-ebpf`, provisioning
//! the toolchain they need (nightly rust-src and a matching bpf-linker) on first use, and
//! compiles the local API's messages (`proto/infermem.proto`) with protox: no `protoc` needed.

fn main() -> anyhow::Result<()> {
    compile_protos()?;
    let toolchain = xtask::toolchain::ensure()?;
    // SAFETY: build scripts are single-threaded; the nested cargo must find bpf-linker.
    unsafe { std::env::set_var("PATH", toolchain.path_env()?) };
    // Only the nested build's warnings and errors are worth forwarding, not its progress.
    // SAFETY: as above.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    // The probes also compile the shared types.
    println!("cargo:rerun-if-changed=../ebpf/infermem-common");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "infermem-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/infermem-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain.nightly),
    )
}

/// Parses the API's `.proto` in Rust (protox) and generates its prost types into `OUT_DIR`.
fn compile_protos() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto/infermem.proto");
    let descriptors = protox::compile(["proto/infermem.proto"], ["proto"])?;
    prost_build::Config::new()
        // `ps --json` and `status --json` print the replies as they are.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}
