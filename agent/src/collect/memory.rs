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

/// Reads the memory split of `pid`. Resident and anonymous bytes and swap come from
/// `smaps_rollup`, which walks the page tables and is exact: the counters of
/// `/proc/<pid>/status` are cached per thread before Linux 6.2 and may lag by 64 pages per
/// thread. Shared memory comes from `status` (`smaps_rollup` has no plain figure for it), and
/// file pages are the rest of the resident set. Without `smaps_rollup`, `status` alone.
pub fn usage(pid: u32) -> Result<MemoryUsage, CollectError> {
    let process = open(pid)?;
    let status = process
        .status()
        .map_err(|e| CollectError::from_proc(pid, "status", e))?;
    let kib = |v: Option<u64>| v.unwrap_or(0) * 1024;
    let shmem = kib(status.rssshmem);
    let rollup = process.smaps_rollup().ok().and_then(|rollup| {
        rollup
            .memory_map_rollup
            .into_iter()
            .next()
            .map(|map| map.extension.map)
    });
    let field = |name: &str| rollup.as_ref().and_then(|r| r.get(name).copied());
    let (rss, anon, swap) = match (field("Rss"), field("Anonymous")) {
        (Some(rss), Some(anon)) => (rss, anon, field("Swap").unwrap_or(0)),
        _ => (
            kib(status.rssanon) + kib(status.rssfile) + shmem,
            kib(status.rssanon),
            kib(status.vmswap),
        ),
    };
    Ok(MemoryUsage {
        rss,
        anon,
        file: rss.saturating_sub(anon).saturating_sub(shmem),
        shmem,
        swap,
        // smaps_rollup's Locked counts resident locked pages; VmLck is the locked *virtual*
        // size.
        locked: field("Locked").unwrap_or_else(|| kib(status.vmlck)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forked child of this test touches 32 MiB of fresh anonymous memory and waits; its
    /// usage is read from outside (the test process itself runs other tests' threads, whose
    /// frees would blur a before/after of its own).
    #[test]
    fn a_child_adds_up_and_its_new_anonymous_pages_are_seen_exactly() {
        const BLOCK: usize = 32 << 20;
        let mut fds = [0; 2];
        // SAFETY: a pipe into a fresh array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only calls async-signal-safe functions (mmap, write, pause).
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: a fresh private anonymous mapping, written page by page.
            unsafe {
                let block = libc::mmap(
                    std::ptr::null_mut(),
                    BLOCK,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
                .cast::<u8>();
                for page in (0..BLOCK).step_by(4096) {
                    block.add(page).write_volatile(1);
                }
                libc::write(fds[1], [1u8].as_ptr().cast(), 1);
                loop {
                    libc::pause();
                }
            }
        }
        let mut byte = 0u8;
        // SAFETY: reading one byte into a local.
        let ready = unsafe { libc::read(fds[0], (&raw mut byte).cast(), 1) };
        let usage = usage(child as u32);
        // SAFETY: our own child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_eq!(ready, 1, "the child touched its block");
        let usage = usage.unwrap();
        assert_eq!(usage.rss, usage.anon + usage.file + usage.shmem);
        assert!(usage.file > 0, "the test binary itself is file-backed");
        assert!(usage.anon >= BLOCK as u64, "anon {} < 32 MiB", usage.anon);
    }
}
