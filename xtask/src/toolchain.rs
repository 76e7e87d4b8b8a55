//! Provisions the toolchain that compiles infermem's eBPF programs, on a fresh machine.
//!
//! The probes are Rust (aya-ebpf) built for `bpfel-unknown-none`, which is a tier-3 target:
//! it needs a nightly toolchain with `rust-src` (for `-Z build-std=core`) and `bpf-linker`.
//! `bpf-linker` must link the *same* LLVM as the nightly `rustc` that emits the bitcode, and no
//! prebuilt one is reachable here, so we build it against the nightly toolchain's own
//! `libLLVM` (found from `rustc +nightly --print sysroot`, never a hard-coded version).
//!
//! The result is cached per nightly commit under `$INFERMEM_TOOLCHAIN_DIR`
//! (default `$XDG_CACHE_HOME/infermem` or `~/.cache/infermem`), so it is built once.

use std::{
    env,
    fs::{self, File},
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

/// The bpf-linker release we build; pinned so that a fresh machine gets what CI tested.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Environment variables of an enclosing cargo build that must not leak into the nested
/// `cargo install` (they would redirect its target directory, flags or compiler).
const LEAKY_CARGO_ENV: &[&str] = &[
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTUP_TOOLCHAIN",
];

/// A ready toolchain for building the eBPF crate.
#[derive(Debug, Clone)]
pub struct BpfToolchain {
    /// The rustup toolchain name used to build eBPF code (`nightly` unless overridden).
    pub nightly: String,
    /// Directory holding a `bpf-linker` that matches `nightly`'s LLVM; put it first on `PATH`.
    pub bin_dir: PathBuf,
}

impl BpfToolchain {
    /// `PATH` with [`Self::bin_dir`] first, for commands that must find `bpf-linker`.
    pub fn path_env(&self) -> Result<std::ffi::OsString> {
        let mut dirs = vec![self.bin_dir.clone()];
        if let Some(path) = env::var_os("PATH") {
            dirs.extend(env::split_paths(&path));
        }
        Ok(env::join_paths(dirs)?)
    }
}

/// Facts about the nightly toolchain that decide which bpf-linker we need.
struct NightlyInfo {
    sysroot: PathBuf,
    commit: String,
    llvm_major: u32,
}

/// Makes sure nightly + rust-src + a matching bpf-linker exist, installing what is missing.
///
/// Safe to call concurrently: installs are serialised with a lock file.
pub fn ensure() -> Result<BpfToolchain> {
    let nightly = env::var("INFERMEM_NIGHTLY").unwrap_or_else(|_| "nightly".to_owned());
    which_rustup()?;
    let info = match nightly_info(&nightly) {
        Ok(info) => info,
        Err(_) => {
            run(rustup()
                .args(["toolchain", "install", &nightly, "--profile", "minimal"])
                .args(["--component", "rust-src"]))
            .with_context(|| format!("installing the {nightly} toolchain"))?;
            nightly_info(&nightly)?
        }
    };
    if !info
        .sysroot
        .join("lib/rustlib/src/rust/library/core")
        .is_dir()
    {
        run(rustup().args(["component", "add", "rust-src", "--toolchain", &nightly]))
            .context("adding rust-src to the nightly toolchain (needed for -Z build-std)")?;
    }

    let root = cache_dir()?.join("bpf-linker").join(format!(
        "{}-llvm{}",
        &info.commit[..info.commit.len().min(12)],
        info.llvm_major
    ));
    let bin_dir = root.join("bin");
    let toolchain = BpfToolchain { nightly, bin_dir };
    if linker_works(&toolchain.bin_dir) {
        return Ok(toolchain);
    }

    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let lock = File::create(root.join(".lock"))?;
    lock.lock().context("locking the bpf-linker cache")?;
    if !linker_works(&toolchain.bin_dir) {
        build_bpf_linker(&toolchain, &info, &root)?;
    }
    ensure!(
        linker_works(&toolchain.bin_dir),
        "bpf-linker was installed in {} but does not run",
        toolchain.bin_dir.display()
    );
    Ok(toolchain)
}

fn build_bpf_linker(toolchain: &BpfToolchain, info: &NightlyInfo, root: &Path) -> Result<()> {
    let prefix = llvm_prefix_shim(info, root)?;
    eprintln!(
        "infermem: building bpf-linker {BPF_LINKER_VERSION} against the {} toolchain's LLVM {} \
         (once per nightly; cached in {})",
        toolchain.nightly,
        info.llvm_major,
        root.display()
    );
    let mut cmd = rustup();
    cmd.args(["run", &toolchain.nightly, "cargo", "install", "bpf-linker"])
        .args([
            "--version",
            &format!("={BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{}", info.llvm_major))
        .arg("--root")
        .arg(root)
        .arg("--target-dir")
        .arg(root.join("build"))
        .env("LLVM_PREFIX", &prefix);
    for var in LEAKY_CARGO_ENV {
        cmd.env_remove(var);
    }
    run(&mut cmd).context("building bpf-linker")?;
    // The build tree is only needed while building.
    let _ = fs::remove_dir_all(root.join("build"));
    Ok(())
}

/// bpf-linker's build wants an LLVM install prefix: `lib/libLLVM.so` to link against and an
/// `llvm-config` to find. We make one whose library is the nightly toolchain's own libLLVM.
fn llvm_prefix_shim(info: &NightlyInfo, root: &Path) -> Result<PathBuf> {
    let prefix = root.join("llvm-prefix");
    let _ = fs::remove_dir_all(&prefix);
    fs::create_dir_all(prefix.join("lib"))?;
    fs::create_dir_all(prefix.join("bin"))?;
    let sysroot_lib = info.sysroot.join("lib");
    let mut llvm_lib = None;
    for entry in fs::read_dir(&sysroot_lib)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("libLLVM") && name.contains(".so") {
            // Keep every name the toolchain ships, so the soname resolves through bpf-linker's
            // rpath (which points at this shim).
            symlink(entry.path(), prefix.join("lib").join(name))?;
            if name.starts_with("libLLVM.so.") {
                llvm_lib = Some(entry.path());
            }
        }
    }
    let Some(llvm_lib) = llvm_lib else {
        bail!(
            "no libLLVM.so.* in {}: this nightly does not ship a shared LLVM",
            sysroot_lib.display()
        );
    };
    symlink(&llvm_lib, prefix.join("lib/libLLVM.so"))?;
    let llvm_config = prefix.join("bin/llvm-config");
    fs::write(
        &llvm_config,
        format!(
            "#!/bin/sh\n# Stand-in for llvm-config: infermem's xtask links bpf-linker against \
             rustc's own libLLVM.\ncase \"$1\" in\n  --version) echo {}.1.0 ;;\n  --libdir) echo \
             {} ;;\n  --prefix) echo {} ;;\n  *) echo ;;\nesac\n",
            info.llvm_major,
            prefix.join("lib").display(),
            prefix.display()
        ),
    )?;
    fs::set_permissions(&llvm_config, fs::Permissions::from_mode(0o755))?;
    Ok(prefix)
}

fn nightly_info(nightly: &str) -> Result<NightlyInfo> {
    let verbose = output(rustup().args(["run", nightly, "rustc", "-vV"]))?;
    let field = |name: &str| {
        verbose
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_owned())
            .with_context(|| format!("`rustc +{nightly} -vV` has no `{name}` line"))
    };
    let commit = field("commit-hash:")?;
    let llvm = field("LLVM version:")?;
    let llvm_major = llvm
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("cannot parse LLVM version {llvm:?}"))?;
    let sysroot = output(rustup().args(["run", nightly, "rustc", "--print", "sysroot"]))?;
    Ok(NightlyInfo {
        sysroot: PathBuf::from(sysroot.trim()),
        commit,
        llvm_major,
    })
}

fn linker_works(bin_dir: &Path) -> bool {
    Command::new(bin_dir.join("bpf-linker"))
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// infermem's cache: `$INFERMEM_TOOLCHAIN_DIR`, `$XDG_CACHE_HOME/infermem` or
/// `~/.cache/infermem`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("INFERMEM_TOOLCHAIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("infermem"));
    }
    let home = env::var_os("HOME").context("neither INFERMEM_TOOLCHAIN_DIR nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/infermem"))
}

fn which_rustup() -> Result<()> {
    output(rustup().arg("--version"))
        .map(drop)
        .context("rustup is required to provision the nightly toolchain for eBPF")
}

fn rustup() -> Command {
    Command::new("rustup")
}

fn run(cmd: &mut Command) -> Result<()> {
    // Child stdout goes to our stderr: from a build script, stdout is read by cargo as
    // directives.
    let status = cmd
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}
