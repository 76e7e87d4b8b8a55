//! `cargo xtask <task>`: see `cargo xtask help`.

use anyhow::{Result, bail};

const HELP: &str = "\
usage: cargo xtask <task>

tasks:
  bootstrap        install the eBPF toolchain (nightly rust-src, matching bpf-linker)
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bootstrap") => {
            let toolchain = xtask::toolchain::ensure()?;
            println!("bpf-linker ready in {}", toolchain.bin_dir.display());
            Ok(())
        }
        Some("help" | "--help" | "-h") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown task {other:?}\n{HELP}"),
    }
}
