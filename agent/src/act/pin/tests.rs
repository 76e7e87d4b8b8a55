//! Pinning real files of a scratch directory in this process (CAP_IPC_LOCK or a
//! RLIMIT_MEMLOCK of a few MiB suffices: the files are 1 MiB). The pin holding a file
//! resident under memory pressure is `tests/pin.rs`.

use std::path::PathBuf;

use super::*;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("infermem-pin-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, bytes: usize) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, vec![7u8; bytes]).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn id_of(path: &Path) -> FileId {
    let meta = std::fs::metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

const HOLDER: Holder = Holder::Process {
    pid: 10,
    start_time: 20,
};

#[test]
fn a_pinned_file_is_wholly_resident_and_released_with_its_last_holder() {
    let s = Scratch::new("holders");
    let path = s.file("model.gguf", 1 << 20);
    let mut pinner = Pinner::new(1 << 30, 0);
    let outcome = pinner.pin(&path, Some(id_of(&path)), HOLDER).unwrap();
    assert_eq!((outcome.bytes, outcome.resident_bytes), (1 << 20, 1 << 20));
    // A second holder shares the pin.
    pinner.pin(&path, None, Holder::Manual).unwrap();
    let pins = pinner.in_force();
    assert_eq!(pins.len(), 1);
    assert_eq!(pins[0].holders, [HOLDER, Holder::Manual]);
    assert_eq!(pins[0].resident_bytes, 1 << 20);
    assert!(pinner.unpin(id_of(&path), Holder::Manual));
    assert_eq!(pinner.in_force().len(), 1, "still held for the process");
    assert!(
        !pinner.unpin(id_of(&path), Holder::Manual),
        "not held twice"
    );
    assert!(pinner.unpin(id_of(&path), HOLDER));
    assert!(pinner.in_force().is_empty());
}

#[test]
fn a_replaced_file_a_directory_a_fifo_and_an_empty_file_are_refused() {
    let s = Scratch::new("refused");
    let path = s.file("model.gguf", 4096);
    let other = s.file("other.gguf", 4096);
    let mut pinner = Pinner::new(1 << 30, 0);
    let err = pinner.pin(&path, Some(id_of(&other)), HOLDER).unwrap_err();
    assert!(matches!(err, PinError::Changed { .. }), "{err}");
    assert!(err.to_string().contains("replaced"));
    let err = pinner.pin(&s.0, None, HOLDER).unwrap_err();
    assert!(matches!(err, PinError::NotRegular(_)), "{err}");
    let fifo = s.0.join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = pinner.pin(&fifo, None, HOLDER).unwrap_err();
    assert!(
        matches!(err, PinError::NotRegular(_)),
        "a FIFO does not block: {err}"
    );
    let empty = s.file("empty", 0);
    assert!(matches!(
        pinner.pin(&empty, None, HOLDER),
        Err(PinError::Empty(_))
    ));
    let link = s.0.join("link");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    assert!(matches!(
        pinner.pin(&link, None, HOLDER),
        Err(PinError::Open { .. })
    ));
    assert!(pinner.in_force().is_empty());
}

#[test]
fn the_budget_and_the_reserve_are_kept() {
    let s = Scratch::new("budget");
    let a = s.file("a", 1 << 20);
    let b = s.file("b", 1 << 20);
    let mut pinner = Pinner::new((1 << 20) + 4096, 0);
    pinner.pin(&a, None, HOLDER).unwrap();
    let err = pinner.pin(&b, None, HOLDER).unwrap_err();
    assert!(matches!(err, PinError::OverBudget { .. }), "{err}");
    let mut greedy = Pinner::new(1 << 30, u64::MAX / 2);
    let err = greedy.pin(&b, None, HOLDER).unwrap_err();
    assert!(matches!(err, PinError::NotEnoughMemory { .. }), "{err}");
    assert!(err.to_string().contains("reserve"));
}
