//! Tests of safe opening on real special files: FIFOs, devices, symlinks, deleted files.

use std::{
    ffi::CString,
    io::Write as _,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    time::{Duration, Instant},
};

use super::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("infermem-open-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

fn refusal(path: &Path) -> &'static str {
    let started = Instant::now();
    let err = open_regular(path).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "{err}");
    match err.reason {
        Refusal::NotRegular(kind) => kind,
        other => panic!("{other}"),
    }
}

#[test]
fn special_files_are_refused_without_blocking() {
    let dir = scratch("special");
    let fifo = dir.join("model.gguf");
    mkfifo(&fifo);
    assert_eq!(refusal(&fifo), "a FIFO");
    assert_eq!(refusal(Path::new("/dev/zero")), "a character device");
    let link = dir.join("config.json");
    std::os::unix::fs::symlink("/dev/urandom", &link).unwrap();
    assert_eq!(refusal(&link), "a character device");
    assert_eq!(refusal(&dir), "a directory");
    let message = open_regular(&fifo).unwrap_err().to_string();
    assert!(
        message.contains("model.gguf: a FIFO, not a regular file"),
        "{message}"
    );
    assert!(
        open_regular(&dir.join("absent"))
            .unwrap_err()
            .is_not_found()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn reads_are_capped() {
    let dir = scratch("capped");
    let path = dir.join("config.json");
    std::fs::write(&path, b"0123456789").unwrap();
    let file = open_regular(&path).unwrap();
    assert_eq!(file.read_capped(10).unwrap(), b"0123456789");
    let err = file.read_capped(9).unwrap_err();
    assert!(
        matches!(err.reason, Refusal::TooLarge { size: 10, limit: 9 }),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_process_files_are_opened_through_its_mappings_and_fds() {
    let dir = scratch("process");
    let mapped_path = dir.join("weights.gguf");
    std::fs::write(&mapped_path, b"GGUF mapped").unwrap();
    let mapped = File::open(&mapped_path).unwrap();
    // SAFETY: a fresh private read-only mapping of a whole open file, unmapped below.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            11,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            mapped.as_raw_fd(),
            0,
        )
    };
    assert_ne!(address, libc::MAP_FAILED);
    let held_path = dir.join("held.safetensors");
    let mut held = File::create(&held_path).unwrap();
    held.write_all(b"held open").unwrap();
    // Both are deleted, and another file takes the mapped one's name.
    std::fs::remove_file(&mapped_path).unwrap();
    std::fs::remove_file(&held_path).unwrap();
    std::fs::write(&mapped_path, b"an impostor").unwrap();

    let files = ProcessFiles::new(std::process::id());
    let read = |path: &Path| files.open(path).unwrap().read_capped(100).unwrap();
    assert_eq!(read(&mapped_path), b"GGUF mapped");
    assert_eq!(read(&held_path), b"held open");
    // A path neither mapped nor open is opened inside the process's root.
    let other = dir.join("other");
    std::fs::write(&other, b"by path").unwrap();
    assert_eq!(read(&other), b"by path");
    assert_eq!(files.open(&other).unwrap().path, other);
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    assert!(matches!(
        files.open(&fifo).map_err(|e| e.reason),
        Err(Refusal::NotRegular("a FIFO"))
    ));
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(address, 11) };
    std::fs::remove_dir_all(dir).unwrap();
}
