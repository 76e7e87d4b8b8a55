//! `cargo xtask test --kernel <vmlinuz|debian12> [--cgroup v1|v2]`: the kernel-facing tests
//! inside QEMU, on another kernel than the host's.
//!
//! The guest is a busybox initramfs holding the test binaries, the `infermem` and `workload`
//! binaries and their shared libraries. Its `/init` mounts what the probes and the memory
//! cgroups need, runs each test binary as root, and writes the output to a second serial port
//! and one `RESULT <name> <exit code>` line per binary to a third. QEMU runs with TCG: this
//! machine's KVM cannot boot stock kernels at a useful speed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cargo::{cargo, profile_dir, run, workspace_root};

/// Test targets of `infermem-tests` that need more than the guest has: Python (`llama`,
/// `ollama`); the host's user and group tools and databases (`daemon_users`); a filesystem
/// whose page cache can be evicted (`pin`: the guest's files live in a ramfs); a terminal
/// multiplexer (`top`, driven in tmux); FUSE, a module the busybox initramfs does not load
/// (`gpu`: its stand-in for the NVIDIA driver is a FUSE file; the NVIDIA probes themselves
/// load and attach in the guest with the other syscall probes).
const HOST_ONLY_TESTS: &[&str] = &["llama", "daemon_users", "ollama", "pin", "top", "gpu"];
/// Unit-test filters of the `infermem` library that touch the kernel or cgroupfs.
const KERNEL_UNIT_TESTS: &[&str] = &["probes::", "collect::"];
/// Debian packages the runner uses, by the program it needs from each.
const TOOLS: &[(&str, &str)] = &[
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/cpio", "cpio"),
    ("/usr/bin/prometheus", "prometheus"),
];
/// Where the build's binaries lie in the guest (the tests find their siblings from there).
const GUEST_PROFILE: &str = "/t/release";
/// Host programs the tests run that busybox does not provide as the tests expect (the
/// `prometheus` test scrapes the agent with a real Prometheus and checks with promtool).
const HOST_PROGRAMS: &[&str] = &[
    "/usr/bin/setpriv",
    "/usr/bin/prometheus",
    "/usr/bin/promtool",
];

/// Which memory cgroup interface the guest mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cgroup {
    V1,
    V2,
}

/// Options of the VM run.
#[derive(Debug, Clone)]
pub struct Options {
    /// A kernel image, or `debian12` for Debian 12's current kernel package.
    pub kernel: String,
    pub cgroup: Cgroup,
    /// Limit for the whole guest run.
    pub timeout: Duration,
}

impl Options {
    /// Parses `--kernel K [--cgroup v1|v2] [--timeout SECONDS]`.
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut options = Options {
            kernel: String::new(),
            cgroup: Cgroup::V2,
            timeout: Duration::from_secs(40 * 60),
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--kernel" => options.kernel = value()?.clone(),
                "--cgroup" => {
                    options.cgroup = match value()?.as_str() {
                        "v1" => Cgroup::V1,
                        "v2" => Cgroup::V2,
                        other => bail!("--cgroup takes v1 or v2, not {other:?}"),
                    }
                }
                "--timeout" => options.timeout = Duration::from_secs(value()?.parse()?),
                other => bail!("unknown option {other:?} of `test --kernel`"),
            }
        }
        ensure!(!options.kernel.is_empty(), "--kernel needs a value");
        Ok(options)
    }
}

/// One test binary to run in the guest.
#[derive(Debug, Clone)]
struct Suite {
    /// Name in the results (the cargo target name).
    name: String,
    /// The binary on the host.
    executable: PathBuf,
    /// Filters passed to the test harness.
    filters: Vec<String>,
}

/// Boots the kernel and runs the kernel-facing tests in it; fails if any fails.
///
/// The guest runs the release build (`--release` below): TCG makes userspace work about 10×
/// slower, and the tests' time budgets (e.g. an inspect ending within its duration plus 5 s)
/// hold for optimized code there (loading the probes, which parses the kernel's BTF, takes
/// 0.6 s unoptimized on the host, 0.3 s optimized). The host run covers the debug build.
pub fn test(options: &Options) -> Result<()> {
    let started = Instant::now();
    ensure_tools()?;
    let kernel = match options.kernel.as_str() {
        "debian12" => debian12_kernel()?,
        path => PathBuf::from(path),
    };
    ensure!(kernel.is_file(), "no kernel image at {}", kernel.display());
    xtask::toolchain::ensure()?;
    cargo(&["build", "--release", "--bins"], &[])?;
    let suites = build_suites()?;
    let work = profile_dir(true).parent().expect("target dir").join("vm");
    let initramfs = build_initramfs(&work, &suites, options.cgroup)?;
    let run = boot(&work, &kernel, &initramfs, options)?;
    let outcome = run.report(&suites);
    println!(
        "VM stage ({}, cgroup {:?}): {:.0} s in all",
        kernel.display(),
        options.cgroup,
        started.elapsed().as_secs_f64()
    );
    outcome
}

/// Installs QEMU, busybox-static and cpio with apt-get when they are missing.
fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(program, _)| !Path::new(program).exists())
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing {}", missing.join(" "));
    let mut install = Command::new("apt-get");
    install.args(["install", "-y", "-q", "--no-install-recommends"]);
    if run(install
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .is_err()
    {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(&mut install)?;
    }
    Ok(())
}

/// Runs `command` and returns its stdout.
fn output(command: &mut Command) -> Result<String> {
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(out.status.success(), "{command:?} failed: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Debian 12's current kernel: the package `linux-image-amd64` depends on today, downloaded
/// (not installed) and unpacked once into `~/.cache/infermem/kernels/<package>`.
fn debian12_kernel() -> Result<PathBuf> {
    let package = debian12_kernel_package()?;
    let dir = xtask::toolchain::cache_dir()?
        .join("kernels")
        .join(&package);
    let image = dir
        .join("boot")
        .join(package.replacen("linux-image-", "vmlinuz-", 1));
    if image.is_file() {
        println!("kernel {package} (cached in {})", dir.display());
        return Ok(image);
    }
    fs::create_dir_all(&dir)?;
    println!("downloading {package}");
    run(Command::new("apt-get")
        .args(["download", "-q", &package])
        .current_dir(&dir))?;
    let deb = fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    run(Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$0\" | tar -x ./boot")
        .arg(&deb)
        .current_dir(&dir))?;
    fs::remove_file(&deb)?;
    ensure!(image.is_file(), "{} has no {}", package, image.display());
    Ok(image)
}

/// `linux-image-6.1.0-NN-amd64`, from the apt sources of this (Debian 12) machine.
fn debian12_kernel_package() -> Result<String> {
    let depends = || output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]));
    let text = match depends() {
        Ok(text) => text,
        Err(_) => {
            run(Command::new("apt-get").args(["update", "-q"]))?;
            depends()?
        }
    };
    let package = kernel_package(&text).context("linux-image-amd64 depends on no kernel")?;
    ensure!(
        package.starts_with("linux-image-6.1."),
        "linux-image-amd64 depends on {package}, not a 6.1 kernel: are this machine's apt \
         sources Debian 12 (bookworm)? (`apt-cache policy linux-image-amd64`)"
    );
    Ok(package)
}

/// The `linux-image-*` package in `apt-cache depends` output.
fn kernel_package(depends: &str) -> Option<String> {
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
}

/// Builds the test binaries and picks the kernel-facing ones.
fn build_suites() -> Result<Vec<Suite>> {
    let args = [
        "test",
        "--no-run",
        "--release",
        "--message-format=json",
        "--package",
        "infermem",
        "--package",
        "infermem-tests",
        "--lib",
        "--tests",
    ];
    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let json = output(
        Command::new(cargo_bin)
            .args(args)
            .current_dir(workspace_root()),
    )?;
    let suites: Vec<Suite> = json.lines().filter_map(suite_of).collect();
    ensure!(
        suites.iter().any(|s| s.name == "infermem") && suites.len() > 1,
        "cargo built none of the kernel-facing tests"
    );
    Ok(suites)
}

/// The suite of one `compiler-artifact` message, if it is a kernel-facing test binary.
fn suite_of(line: &str) -> Option<Suite> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    let executable = PathBuf::from(message["executable"].as_str()?);
    let target = &message["target"];
    let name = target["name"].as_str()?.to_owned();
    let kind = target["kind"][0].as_str()?;
    let package = message["package_id"].as_str()?;
    let filters = match kind {
        "lib" if name == "infermem" => KERNEL_UNIT_TESTS.iter().map(|f| f.to_string()).collect(),
        "test" if package.contains("infermem-tests") && !HOST_ONLY_TESTS.contains(&&*name) => {
            Vec::new()
        }
        _ => return None,
    };
    Some(Suite {
        name,
        executable,
        filters,
    })
}

/// Lays out the guest's root file system under `work/root` and packs it as a cpio archive.
fn build_initramfs(work: &Path, suites: &[Suite], cgroup: Cgroup) -> Result<PathBuf> {
    let root = work.join("root");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    let profile = root.join(&GUEST_PROFILE[1..]);
    fs::create_dir_all(profile.join("deps"))?;
    let mut binaries = vec![PathBuf::from("/bin/busybox")];
    for name in ["infermem", "workload"] {
        binaries.push(stage(&profile_dir(true).join(name), &profile.join(name))?);
    }
    for suite in suites {
        let file = suite.executable.file_name().context("test binary name")?;
        binaries.push(stage(&suite.executable, &profile.join("deps").join(file))?);
    }
    for program in HOST_PROGRAMS {
        binaries.push(stage(Path::new(program), &root.join(&program[1..]))?);
    }
    for library in shared_libraries(&binaries)? {
        copy(&library, &root.join(library.strip_prefix("/")?))?;
    }
    copy(Path::new("/bin/busybox"), &root.join("bin/busybox"))?;
    let init = root.join("init");
    fs::write(&init, init_script(suites, cgroup))?;
    set_executable(&init)?;
    let archive = work.join("initramfs.cpio");
    let file = fs::File::create(&archive)?;
    run(Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet")
        .current_dir(&root)
        .stdout(file))?;
    Ok(archive)
}

/// Copies a binary into the guest without its debug information; returns the host path.
fn stage(binary: &Path, to: &Path) -> Result<PathBuf> {
    fs::create_dir_all(to.parent().context("no parent")?)?;
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(to))?;
    Ok(binary.to_owned())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to.parent().context("no parent")?)?;
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The shared libraries (and the dynamic loader) of `binaries`, as `ldd` resolves them.
fn shared_libraries(binaries: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut libraries = std::collections::BTreeSet::new();
    for binary in binaries {
        // ldd fails on static binaries ("not a dynamic executable"): they need nothing.
        let Ok(out) = Command::new("ldd").arg(binary).output() else {
            continue;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = match line.split_once("=>") {
                Some((_, target)) => target.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(path) = path.filter(|p| p.starts_with('/')) {
                libraries.insert(PathBuf::from(path));
            }
        }
    }
    Ok(libraries.into_iter().collect())
}

/// The guest's `/init`: mounts, then each suite with a time limit, then power off.
fn init_script(suites: &[Suite], cgroup: Cgroup) -> String {
    let cgroup_setup = match cgroup {
        Cgroup::V2 => {
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
             echo +memory > /sys/fs/cgroup/cgroup.subtree_control\n\
             CG=/sys/fs/cgroup"
        }
        Cgroup::V1 => {
            "mount -t tmpfs cgroup /sys/fs/cgroup\n\
             mkdir /sys/fs/cgroup/memory\n\
             mount -t cgroup -o memory memory /sys/fs/cgroup/memory\n\
             CG=/sys/fs/cgroup/memory"
        }
    };
    let mut steps = format!("step doctor {GUEST_PROFILE}/infermem doctor\n");
    for suite in suites {
        let file = suite.executable.file_name().unwrap_or_default();
        steps += &format!(
            "step {} {GUEST_PROFILE}/deps/{} --test-threads=1 {}\n",
            suite.name,
            file.to_string_lossy(),
            suite.filters.join(" ")
        );
    }
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
mkdir -p /proc /sys /dev /tmp /root /t/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
# Test files on a disk-like file system: ramfs pages count as file pages, tmpfs's as shmem.
mount -t ramfs ramfs /t/tmp
{cgroup_setup}
# The tests run in a memory cgroup of their own, as a service would.
mkdir $CG/infermem-tests
echo $$ > $CG/infermem-tests/cgroup.procs
ip link set lo up 2>/dev/null
exec 3>/dev/ttyS1 4>/dev/ttyS2
echo "KERNEL $(uname -rv)" >&4
step() {{
    name=$1; shift
    echo "==== $name: $*" >&3
    cd /t && timeout -s KILL 1200 "$@" >&3 2>&3 </dev/null
    echo "RESULT $name $?" >&4
}}
{steps}echo DONE >&4
sync
poweroff -f
"#
    )
}

/// A finished guest run: its console, the tests' output and the result lines.
struct GuestRun {
    console: String,
    output: String,
    results: String,
    timed_out: bool,
}

/// Boots QEMU with TCG and waits for it to power off (or kills it at the timeout).
fn boot(work: &Path, kernel: &Path, initramfs: &Path, options: &Options) -> Result<GuestRun> {
    let files = ["console.log", "tests.log", "results.log"].map(|f| work.join(f));
    // A soft lockup panics (and so ends the run at once) with every CPU's backtrace.
    let mut append = String::from(
        "rdinit=/init console=ttyS0 panic=-1 loglevel=4 softlockup_panic=1 \
         softlockup_all_cpu_backtrace=1",
    );
    if options.cgroup == Cgroup::V2 {
        append += " cgroup_no_v1=all";
    }
    let mut qemu = Command::new("qemu-system-x86_64");
    // Two guest CPUs on one host thread. With multi-threaded TCG, one run in six (on a loaded
    // host) had both guest CPUs stuck for minutes (soft lockups), one in `infermem` starting up,
    // i.e. attaching probes, which patches tracepoint code, the other in the test process. We
    // suspect multi-threaded TCG's handling of code one CPU patches while another runs it;
    // round-robin TCG cannot race there. Not reproduced since, with either mode.
    qemu.args(["-accel", "tcg,thread=single", "-cpu", "max", "-smp", "2"])
        .args(["-m", "4G", "-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", &append]);
    for file in &files {
        qemu.arg("-serial").arg(format!("file:{}", file.display()));
    }
    println!(
        "booting {} with cgroup {:?}",
        kernel.display(),
        options.cgroup
    );
    let started = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let timed_out = loop {
        if child.try_wait()?.is_some() {
            break false;
        }
        if started.elapsed() > options.timeout {
            child.kill()?;
            child.wait()?;
            break true;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("guest ran {:.0} s", started.elapsed().as_secs_f64());
    let read = |path: &PathBuf| {
        fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    };
    Ok(GuestRun {
        console: read(&files[0]),
        output: read(&files[1]),
        results: read(&files[2]),
        timed_out,
    })
}

impl GuestRun {
    /// Prints the tests' output and a summary; fails unless every step passed.
    fn report(&self, suites: &[Suite]) -> Result<()> {
        println!("{}", self.output);
        let kernel = self.results.lines().find_map(|l| l.strip_prefix("KERNEL "));
        println!(
            "guest kernel: {}",
            kernel.unwrap_or("unknown (never booted?)")
        );
        let names = std::iter::once("doctor").chain(suites.iter().map(|s| s.name.as_str()));
        let mut failed = Vec::new();
        for name in names {
            let code = self.results.lines().find_map(|l| {
                let rest = l.strip_prefix("RESULT ")?.strip_prefix(name)?;
                rest.strip_prefix(' ')?.trim().parse::<i32>().ok()
            });
            let verdict = match code {
                Some(0) => "ok".to_owned(),
                Some(code) => format!("FAILED (exit code {code})"),
                None => "NO RESULT (the guest stopped before it finished)".to_owned(),
            };
            println!("vm test {name}: {verdict}");
            if code != Some(0) {
                failed.push(name);
            }
        }
        let panicked = self.console.contains("Kernel panic");
        let done = self.results.lines().any(|l| l == "DONE");
        if failed.is_empty() && done && !panicked && !self.timed_out {
            return Ok(());
        }
        println!("==== guest console\n{}", self.console);
        bail!(
            "the VM run failed: {}{}{}",
            if failed.is_empty() {
                String::new()
            } else {
                format!("failed: {}; ", failed.join(", "))
            },
            if panicked {
                "the guest kernel panicked; "
            } else {
                ""
            },
            if self.timed_out { "timed out" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_kernel_package_in_apt_cache_depends() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            kernel_package(text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(kernel_package("linux-image-amd64\n"), None);
    }

    #[test]
    fn options_parse_kernel_and_cgroup() {
        let args: Vec<String> = ["--kernel", "debian12", "--cgroup", "v1"]
            .map(String::from)
            .into();
        let options = Options::parse(&args).unwrap();
        assert_eq!(options.kernel, "debian12");
        assert_eq!(options.cgroup, Cgroup::V1);
        assert!(Options::parse(&["--cgroup".into(), "v3".into()]).is_err());
    }
}
