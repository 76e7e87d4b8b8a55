//! A process's resident memory split, from `/proc/<pid>/status` and `smaps_rollup`.

use super::{CollectError, open};

/// Resident memory of a process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryUsage {
    /// RssAnon + RssFile + RssShmem.
    pub rss: u64,
    pub anon: u64,
    /// Resident file-backed pages (model weights mapped with mmap show up here).
    pub file: u64,
    pub shmem: u64,
    /// Pages of this process in swap.
    pub swap: u64,
    /// Resident bytes in mlocked mappings (smaps_rollup `Locked`; `VmLck` if unreadable).
    pub locked: u64,
}

/// Reads the memory split of `pid`.
pub fn usage(pid: u32) -> Result<MemoryUsage, CollectError> {
    let process = open(pid)?;
    let status = process
        .status()
        .map_err(|e| CollectError::from_proc(pid, "status", e))?;
    let kib = |v: Option<u64>| v.unwrap_or(0) * 1024;
    let (anon, file, shmem) = (
        kib(status.rssanon),
        kib(status.rssfile),
        kib(status.rssshmem),
    );
    // smaps_rollup's Locked counts resident locked pages; VmLck is the locked *virtual* size.
    let locked = process
        .smaps_rollup()
        .ok()
        .and_then(|rollup| {
            rollup
                .memory_map_rollup
                .iter()
                .find_map(|map| map.extension.map.get("Locked").copied())
        })
        .unwrap_or_else(|| kib(status.vmlck));
    Ok(MemoryUsage {
        rss: anon + file + shmem,
        anon,
        file,
        shmem,
        swap: kib(status.vmswap),
        locked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_memory_adds_up_and_sees_new_anonymous_pages() {
        let before = usage(std::process::id()).unwrap();
        assert_eq!(before.rss, before.anon + before.file + before.shmem);
        assert!(before.file > 0, "the test binary itself is file-backed");
        // Touch 32 MiB of fresh anonymous memory; RssAnon must grow by about that much.
        let mut block = vec![0u8; 32 << 20];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        let after = usage(std::process::id()).unwrap();
        std::hint::black_box(&block);
        let grown = after.anon.saturating_sub(before.anon);
        assert!(grown >= 30 << 20, "anon grew by only {grown} bytes");
    }
}
