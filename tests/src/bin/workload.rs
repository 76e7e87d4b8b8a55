//! Real workloads for the end-to-end tests: the memory behaviour infermem must see.
//!
//! Every mode prints one JSON line per milestone on stdout and waits for a line on stdin
//! where the test must synchronise (so an observer can attach first):
//!
//! - `map-and-alloc FILE FILE_MIB ANON_MIB`: maps FILE, waits, reads every page of it, then
//!   maps ANON_MIB of anonymous memory and writes every page; then waits until stdin closes.
//! - `storm FILE CHILDREN`: maps 4 MiB of FILE, then forks CHILDREN processes that each map
//!   4 MiB of FILE and 2 MiB of anonymous memory, touch them, grow the heap and exit; prints
//!   their pids.
//! - `hog MIB_PER_STEP`: waits, then allocates and touches memory until the OOM killer ends it.
//! - `map-file FILE [ARGS…]`: maps all of FILE (read-only, private), says so, then waits until
//!   stdin closes; ARGS are ignored (tests put what infermem must not reveal there).
//! - `chroot DIR`: changes its root to DIR, says so, then waits until stdin closes (a process
//!   whose paths mean something else than the host's, as in a container).
//! - `ramp MIB_PER_S STOP_MIB`: waits, then allocates and writes anonymous memory at
//!   MIB_PER_S (in 1 MiB steps, paced by the clock) until STOP_MIB (0: forever, until the OOM
//!   killer ends it), says `plateau`, then waits until stdin closes.
//! - `bursty MIB_PER_S BURST_MIB STOP_MIB`: as `ramp` on average, in bursts of BURST_MIB
//!   written at once.
//! - `steady MIB`: allocates MIB, then rewrites a tenth of it every 100 ms (a server at a
//!   constant footprint) until stdin closes.
//! - `opens ITERATIONS`: waits, then opens `/dev/null`, asks it `FIONREAD` and closes it,
//!   ITERATIONS times (the syscalls the NVIDIA probes look at, on a file that is not NVIDIA's,
//!   for `cargo xtask bench overhead`); prints the elapsed nanoseconds.
//! - `churn MIB ITERATIONS`: waits, then maps MIB of anonymous memory, writes every page and
//!   unmaps it, ITERATIONS times (a fault-heavy load for `cargo xtask bench overhead`); prints
//!   the elapsed nanoseconds.
//! - `serve FILE`: a model server's reads of its weights: drops FILE from the page cache (so
//!   that its pages are charged where this process runs when it reads them), maps it
//!   read-only and shared (as llama.cpp does), says `waiting`; at a line, reads one byte of
//!   every page of it, pass after pass, and says `rate` about once a second (`work`: pages
//!   read since the last `rate`, over `seconds`; `t`: Unix time) until stdin closes (for
//!   `cargo xtask bench protect`).
//! - `read FILE`: drops FILE from the page cache, then reads it once with read(2) (its pages
//!   come back into the page cache, charged to this process's memory cgroup), says `read`,
//!   then waits until stdin closes (a page-cache load, or a flood of one).
//! - `nvidia-script DIR DRIVER_VERSION`: in a private mount namespace, mounts a tmpfs on
//!   `/dev` and binds the stand-in driver's files in DIR (see `infermem_tests::nvidia`) at
//!   `/dev/nvidiactl`, `/dev/nvidia0`, `/dev/nvidia1` and `/dev/nvidia-uvm`; opens them, says
//!   `opened`, then makes one RM escape per line of stdin (a `nvidia::Step`, its block laid
//!   out for DRIVER_VERSION) and says `step` with what the ioctl returned, until stdin closes.

use std::{
    ffi::CString,
    fs::File,
    io::{BufRead as _, Write as _},
    os::fd::AsRawFd as _,
    ptr,
};

use infermem_tests::nvidia::{self, DeviceFds, Layout, Step};

const PAGE: usize = 4096;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).unwrap_or_else(|| usage()).as_str();
    let number = |i: usize| arg(i).parse::<usize>().unwrap_or_else(|_| usage());
    match arg(0) {
        "map-and-alloc" => map_and_alloc(arg(1), number(2), number(3)),
        "storm" => storm(arg(1), number(2)),
        "hog" => hog(number(1)),
        "churn" => churn(number(1), number(2)),
        "opens" => opens(number(1)),
        "ramp" => ramp(number(1), 1, number(2)),
        "bursty" => ramp(number(1), number(2), number(3)),
        "steady" => steady(number(1)),
        "map-file" => map_file(arg(1)),
        "chroot" => chroot(arg(1)),
        "serve" => serve(arg(1)),
        "read" => read_once(arg(1)),
        "nvidia-script" => nvidia_script(arg(1), arg(2)),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: workload map-and-alloc FILE FILE_MIB ANON_MIB | storm FILE CHILDREN | hog MIB_PER_STEP | ramp MIB_PER_S STOP_MIB | bursty MIB_PER_S BURST_MIB STOP_MIB | steady MIB | churn MIB ITERATIONS | opens ITERATIONS | map-file FILE | chroot DIR | serve FILE | read FILE | nvidia-script DIR DRIVER_VERSION"
    );
    std::process::exit(2)
}

fn say(json: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{json}").expect("stdout");
    out.flush().expect("stdout");
}

fn wait_for_line() -> bool {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
}

/// mmap wrapper that exits loudly on failure (this is a test workload).
fn map(len: usize, prot: i32, flags: i32, fd: i32) -> *mut u8 {
    // SAFETY: a fresh mapping; the kernel picks the address.
    let addr = unsafe { libc::mmap(ptr::null_mut(), len, prot, flags, fd, 0) };
    assert_ne!(
        addr,
        libc::MAP_FAILED,
        "mmap failed: {}",
        std::io::Error::last_os_error()
    );
    addr.cast()
}

/// Anonymous memory that is never backed by transparent huge pages, so one write fault is
/// one 4 KiB page.
fn anonymous(len: usize) -> *mut u8 {
    let addr = map(
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    );
    // SAFETY: advising our own mapping.
    unsafe { libc::madvise(addr.cast(), len, libc::MADV_NOHUGEPAGE) };
    addr
}

fn touch_pages(addr: *mut u8, len: usize, write: bool) -> u64 {
    let mut sum = 0u64;
    for offset in (0..len).step_by(PAGE) {
        // SAFETY: inside a mapping of `len` bytes.
        unsafe {
            if write {
                ptr::write_volatile(addr.add(offset), 1);
            } else {
                sum += ptr::read_volatile(addr.add(offset)) as u64;
            }
        }
    }
    sum
}

fn map_file(path: &str) {
    let file = File::open(path).expect("open the file to map");
    let len = file.metadata().expect("fstat").len() as usize;
    map(len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd());
    say(&format!(r#"{{"event":"mapped","bytes":{len}}}"#));
    while wait_for_line() {}
}

fn chroot(dir: &str) {
    let dir = std::ffi::CString::new(dir).expect("a path without NUL");
    // SAFETY: valid NUL-terminated paths.
    let rooted = unsafe { libc::chroot(dir.as_ptr()) == 0 && libc::chdir(c"/".as_ptr()) == 0 };
    assert!(rooted, "chroot: {}", std::io::Error::last_os_error());
    say(r#"{"event":"rooted"}"#);
    while wait_for_line() {}
}

fn map_and_alloc(path: &str, file_mib: usize, anon_mib: usize) {
    let file = File::open(path).expect("open the model file");
    let file_len = file_mib << 20;
    let weights = map(
        file_len,
        libc::PROT_READ,
        libc::MAP_PRIVATE,
        file.as_raw_fd(),
    );
    say(&format!(
        r#"{{"event":"mapped","pid":{},"file_addr":{}}}"#,
        std::process::id(),
        weights as u64
    ));
    if !wait_for_line() {
        return;
    }
    let checksum = touch_pages(weights, file_len, false);
    let anon_len = anon_mib << 20;
    let kv = anonymous(anon_len);
    touch_pages(kv, anon_len, true);
    say(&format!(
        r#"{{"event":"touched","file_pages":{},"anon_pages":{},"anon_addr":{},"checksum":{checksum}}}"#,
        file_len / PAGE,
        anon_len / PAGE,
        kv as u64
    ));
    // Hold until the test closes stdin.
    while wait_for_line() {}
}

fn storm(path: &str, children: usize) {
    let file = File::open(path).expect("open the model file");
    // The parent holds a large file mapping too, so its forks are reported.
    let shared = map(
        4 << 20,
        libc::PROT_READ,
        libc::MAP_PRIVATE,
        file.as_raw_fd(),
    );
    touch_pages(shared, 4 << 20, false);
    let mut pids = Vec::with_capacity(children);
    for _ in 0..children {
        // SAFETY: this process is single-threaded; the child only makes syscalls and exits.
        match unsafe { libc::fork() } {
            0 => {
                let weights = map(
                    4 << 20,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE,
                    file.as_raw_fd(),
                );
                touch_pages(weights, 4 << 20, false);
                let scratch = anonymous(2 << 20);
                touch_pages(scratch, 2 << 20, true);
                // SAFETY: growing our own heap by 2 MiB, then exiting without unwinding.
                unsafe {
                    let top = libc::sbrk(0);
                    libc::brk(top.cast::<u8>().add(2 << 20).cast());
                    libc::_exit(0);
                }
            }
            -1 => panic!("fork failed: {}", std::io::Error::last_os_error()),
            pid => pids.push(pid),
        }
    }
    for &pid in &pids {
        let mut status = 0;
        // SAFETY: reaping our own children.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    let list: Vec<String> = pids.iter().map(ToString::to_string).collect();
    say(&format!(
        r#"{{"event":"stormed","pids":[{}]}}"#,
        list.join(",")
    ));
}

fn hog(mib_per_step: usize) {
    say(&format!(
        r#"{{"event":"waiting","pid":{}}}"#,
        std::process::id()
    ));
    if !wait_for_line() {
        return;
    }
    let mut total = 0usize;
    loop {
        let step = mib_per_step << 20;
        touch_pages(anonymous(step), step, true);
        total += step;
        say(&format!(r#"{{"event":"allocated","bytes":{total}}}"#));
    }
}

fn churn(mib: usize, iterations: usize) {
    say(&format!(
        r#"{{"event":"waiting","pid":{}}}"#,
        std::process::id()
    ));
    if !wait_for_line() {
        return;
    }
    let len = mib << 20;
    let start = std::time::Instant::now();
    for _ in 0..iterations {
        let block = anonymous(len);
        touch_pages(block, len, true);
        // SAFETY: unmapping the block we mapped.
        unsafe { libc::munmap(block.cast(), len) };
    }
    let ns = start.elapsed().as_nanos();
    say(&format!(
        r#"{{"event":"churned","ns":{ns},"faults":{}}}"#,
        iterations * len / PAGE
    ));
}

/// Opens, queries and closes `/dev/null` `iterations` times, timed.
fn opens(iterations: usize) {
    say(&format!(
        r#"{{"event":"waiting","pid":{}}}"#,
        std::process::id()
    ));
    if !wait_for_line() {
        return;
    }
    let path = c"/dev/null";
    let start = std::time::Instant::now();
    for _ in 0..iterations {
        // SAFETY: a valid C string; the fd is ours and closed below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        assert!(fd >= 0, "open /dev/null");
        let mut waiting: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int; /dev/null refuses it, which costs the same path.
        unsafe { libc::ioctl(fd, libc::FIONREAD, &mut waiting) };
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(fd) };
    }
    let ns = start.elapsed().as_nanos();
    say(&format!(r#"{{"event":"opened","ns":{ns}}}"#));
}

/// Allocates at `mib_per_s` on average, `step_mib` at a time, until `stop_mib` (0: never).
fn ramp(mib_per_s: usize, step_mib: usize, stop_mib: usize) {
    say(&format!(
        r#"{{"event":"waiting","pid":{}}}"#,
        std::process::id()
    ));
    if !wait_for_line() {
        return;
    }
    let start = std::time::Instant::now();
    say(r#"{"event":"ramping"}"#);
    let mut total_mib = 0usize;
    while stop_mib == 0 || total_mib < stop_mib {
        // The step is written when the clock says the ramp has reached it.
        let due = std::time::Duration::from_secs_f64(total_mib as f64 / mib_per_s as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let step = step_mib << 20;
        touch_pages(anonymous(step), step, true);
        total_mib += step_mib;
    }
    say(&format!(r#"{{"event":"plateau","mib":{total_mib}}}"#));
    while wait_for_line() {}
}

/// A constant footprint, kept in use.
fn steady(mib: usize) {
    let len = mib << 20;
    let block = anonymous(len);
    touch_pages(block, len, true);
    say(&format!(
        r#"{{"event":"steady","pid":{}}}"#,
        std::process::id()
    ));
    let stdin_closed = stdin_closed();
    let tenth = (len / 10).max(PAGE);
    let mut offset = 0;
    while !stdin_closed.load(std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: `offset..offset + tenth` stays inside the block.
        touch_pages(unsafe { block.add(offset) }, tenth.min(len - offset), true);
        offset = (offset + tenth) % len;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A flag that turns true when stdin closes (a thread reads it until then).
fn stdin_closed() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&closed);
    std::thread::spawn(move || {
        while wait_for_line() {}
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    closed
}

/// A model server's reads of its mapped weights, one byte a page, pass after pass, with the
/// pages read each second.
fn serve(path: &str) {
    let file = File::open(path).expect("open the model file");
    let len = file.metadata().expect("fstat").len() as usize;
    // SAFETY: advice about our own open file.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let weights = map(len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd());
    say(&format!(
        r#"{{"event":"waiting","pid":{},"pages":{}}}"#,
        std::process::id(),
        len.div_ceil(PAGE)
    ));
    if !wait_for_line() {
        return;
    }
    let stdin_closed = stdin_closed();
    let (mut last, mut pages, mut sum) = (std::time::Instant::now(), 0u64, 0u64);
    while !stdin_closed.load(std::sync::atomic::Ordering::Relaxed) {
        // 64 pages at a time, so that a pass slowed by major faults still reports each second.
        for offset in (0..len).step_by(64 * PAGE) {
            let chunk = (len - offset).min(64 * PAGE);
            // SAFETY: `offset..offset + chunk` stays inside the mapping.
            sum = sum.wrapping_add(touch_pages(unsafe { weights.add(offset) }, chunk, false));
            pages += chunk.div_ceil(PAGE) as u64;
            let seconds = last.elapsed().as_secs_f64();
            if seconds >= 1.0 {
                say(&format!(
                    r#"{{"event":"rate","t":{:.3},"seconds":{seconds:.3},"work":{pages},"checksum":{sum}}}"#,
                    unix_time()
                ));
                (last, pages) = (std::time::Instant::now(), 0);
                if stdin_closed.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
            }
        }
    }
}

/// Reads a file once through the page cache, after dropping it from there.
fn read_once(path: &str) {
    use std::io::Read as _;
    let mut file = File::open(path).expect("open the file");
    // SAFETY: advice about our own open file.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let (mut buffer, mut bytes) = (vec![0u8; 1 << 20], 0u64);
    loop {
        match file.read(&mut buffer).expect("read the file") {
            0 => break,
            n => bytes += n as u64,
        }
    }
    say(&format!(
        r#"{{"event":"read","pid":{},"bytes":{bytes}}}"#,
        std::process::id()
    ));
    while wait_for_line() {}
}

/// Seconds since the Unix epoch.
fn unix_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `mount(2)` that exits loudly on failure.
fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) {
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (source, target, fstype) = (c(source), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings; no filesystem data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            ptr::null(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount {source:?} on {target:?}: {}",
        std::io::Error::last_os_error()
    );
}

/// A mount namespace of this process's own whose `/dev` is a fresh tmpfs holding only the
/// stand-in driver's files from `dir`, bound at the NVIDIA device paths: the host's `/dev`
/// is left untouched.
fn private_nvidia_dev(dir: &str) {
    // SAFETY: this process is single-threaded here; unshare has no memory preconditions.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNS): {}",
        std::io::Error::last_os_error()
    );
    // Nothing mounted from here on propagates to the host.
    mount("none", "/", "", libc::MS_REC | libc::MS_PRIVATE);
    mount("none", "/dev", "tmpfs", libc::MS_NOSUID | libc::MS_NOEXEC);
    for node in nvidia::NODES {
        let target = format!("/dev/{node}");
        File::create(&target).unwrap_or_else(|e| panic!("create {target}: {e}"));
        mount(&format!("{dir}/{node}"), &target, "", libc::MS_BIND);
    }
}

/// Scripted RM escapes through the stand-in driver, one ioctl per line of stdin.
fn nvidia_script(dir: &str, version: &str) {
    let layout = Layout::of_version(version);
    private_nvidia_dev(dir);
    let fds = DeviceFds::open();
    say(&format!(
        r#"{{"event":"opened","pid":{},"fds":{}}}"#,
        std::process::id(),
        fds.json()
    ));
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("read stdin");
        let step: Step = line.parse().unwrap_or_else(|e| panic!("bad step: {e}"));
        say(&step.perform(layout, &fds).json(&step));
    }
}
