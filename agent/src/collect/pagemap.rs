//! Which pages of an address range are in memory, from `/proc/<pid>/pagemap` (one 64-bit
//! entry per page: bit 63 present, bit 62 swapped). Readable by the process's owner; page
//! frame numbers, which need CAP_SYS_ADMIN, are not used.

use std::{fs::File, os::unix::fs::FileExt as _};

/// Most entries read for one range; longer ranges are sampled evenly.
pub const MAX_SAMPLES: u64 = 4096;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;

/// The share (0 to 1) of the pages of `[start, start + len)` that are resident or swapped
/// out, i.e. that were written at some point; `None` when pagemap cannot be read.
pub fn populated_share(pid: u32, start: u64, len: u64) -> Option<f64> {
    let page = page_size();
    let first = start / page;
    let pages = len.div_ceil(page);
    if pages == 0 {
        return None;
    }
    let file = File::open(format!("/proc/{pid}/pagemap")).ok()?;
    let stride = pages.div_ceil(MAX_SAMPLES).max(1);
    let (mut seen, mut populated) = (0u64, 0u64);
    let mut entry = [0u8; 8];
    let mut index = 0;
    while index < pages {
        file.read_exact_at(&mut entry, (first + index) * 8).ok()?;
        seen += 1;
        if u64::from_le_bytes(entry) & (PRESENT | SWAPPED) != 0 {
            populated += 1;
        }
        index += stride;
    }
    Some(populated as f64 / seen as f64)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_pages_are_populated_and_untouched_ones_are_not() {
        let len = 64 * page_size() as usize;
        // A fresh mapping, not the heap: freed heap memory of other tests may be populated.
        // SAFETY: a new private anonymous mapping, unmapped at the end of the test.
        let buffer = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(buffer, libc::MAP_FAILED);
        // Write the first half only.
        // SAFETY: the first half of the mapping.
        unsafe { std::ptr::write_bytes(buffer.cast::<u8>(), 1, len / 2) };
        let start = buffer as u64;
        let pid = std::process::id();
        let half = populated_share(pid, start, (len / 2) as u64).unwrap();
        assert_eq!(half, 1.0);
        let rest = populated_share(pid, start + len as u64 / 2, len as u64 / 2).unwrap();
        assert_eq!(rest, 0.0);
        assert_eq!(populated_share(pid, start, 0), None);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(buffer, len) };
    }
}
