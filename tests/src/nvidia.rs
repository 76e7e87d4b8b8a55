//! A stand-in for the NVIDIA driver, so that the GPU tests run on hosts without a GPU, and the
//! scripted RM escapes a test program makes through it.
//!
//! What is simulated and what is real:
//! - The driver is simulated by [`FakeDriver`], a FUSE filesystem of four regular files
//!   ([`NODES`]: `nvidiactl`, `nvidia0`, `nvidia1`, `nvidia-uvm`). The kernel's FUSE code hands
//!   its ioctl handler the parameter block of a fixed-size `_IOWR('F', nr, size)` command and
//!   copies what it returns back into the caller's memory, as the driver's escape does. It
//!   answers as RM does for what the agent reads: the block comes back with its `status`
//!   written (`NV_OK`, or `NV_ERR_NO_MEMORY` for the handles it was told to refuse) and, for
//!   a client allocated with handle 0, a new client handle in `hObjectNew`. It keeps no
//!   objects, allocates nothing, pins nothing, and checks nothing else.
//! - The test program (`workload nvidia-script`) binds those files at `/dev/nvidiactl`,
//!   `/dev/nvidia0`, `/dev/nvidia1` and `/dev/nvidia-uvm` in a private mount namespace (on a
//!   tmpfs of its own at `/dev`: nothing appears in the host's `/dev`), opens them by those
//!   paths, and makes each scripted [`Step`] one real `ioctl` syscall. The syscalls, and the
//!   eBPF probes that watch them, are real.
//! - The parameter blocks are laid out here from the offsets read from NVIDIA's
//!   open-gpu-kernel-modules headers (`shared/nvidia-rm-ioctls.md`; NVOS32's checked again in
//!   `nvos.h`), independently of the agent's decoder: the tests compare two readings of the
//!   same headers.

use std::{
    collections::HashSet,
    ffi::{CString, OsStr},
    fmt,
    os::fd::RawFd,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    str::FromStr,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, UNIX_EPOCH},
};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, Generation,
    INodeNo, IoctlFlags, MountOption, ReplyAttr, ReplyEntry, ReplyIoctl, Request,
};

use crate::{Talker, scratch_dir, workload_bin};

/// `NV_IOCTL_MAGIC`, the type byte of every RM escape.
const MAGIC: u32 = b'F' as u32;

/// The RM escapes the scripts make (`nv_escape.h`, unchanged from 515 to 595).
pub mod escape {
    pub const RM_ALLOC_MEMORY: u32 = 0x27;
    pub const RM_FREE: u32 = 0x29;
    pub const RM_ALLOC: u32 = 0x2b;
    pub const RM_DUP_OBJECT: u32 = 0x34;
    pub const RM_VID_HEAP_CONTROL: u32 = 0x4a;
}

/// RM classes the scripts allocate (`class/*.h`).
pub mod class {
    /// `NV01_ROOT_CLIENT`: an RM client.
    pub const ROOT_CLIENT: u32 = 0x41;
    /// `NV01_DEVICE_0`; its allocation parameters start with `deviceId`.
    pub const DEVICE: u32 = 0x80;
    /// `NV20_SUBDEVICE_0`.
    pub const SUBDEVICE: u32 = 0x2080;
    /// `NV01_MEMORY_SYSTEM`: host memory.
    pub const MEMORY_SYSTEM: u32 = 0x3e;
    /// `NV01_MEMORY_LOCAL_USER`: video memory.
    pub const MEMORY_LOCAL_USER: u32 = 0x40;
    /// `NV01_MEMORY_SYSTEM_OS_DESCRIPTOR`: pinned user pages (size = limit + 1).
    pub const OS_DESCRIPTOR: u32 = 0x71;
}

/// RM's `NV_OK`.
pub const NV_OK: u32 = 0;
/// RM's `NV_ERR_NO_MEMORY`, the status of a refused allocation.
pub const NV_ERR_NO_MEMORY: u32 = 0x51;

/// The first client handle the stand-in hands out (RM's look alike: `0xc1d0xxxx`).
pub const FIRST_CLIENT: u32 = 0xc1d0_0001;

/// The command of an `_IOWR('F', nr, size)` escape.
pub fn iowr(nr: u32, size: usize) -> u32 {
    0xc000_0000 | ((size as u32 & 0x3fff) << 16) | (MAGIC << 8) | nr
}

/// Where the driver families put the fields of `NV_ESC_RM_ALLOC`'s parameter structures
/// (NVOS21 and NVOS64); the other escapes' blocks are the same in every family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// 515–524: NVOS21 status at 24; NVOS64 of 40 bytes, status at 32.
    R515,
    /// 525–534: NVOS21 status at 24; NVOS64 of 40 bytes, flags at 32, status at 36.
    R525,
    /// 535 on: NVOS21 paramsSize at 24, status at 28; NVOS64 of 48 bytes, paramsSize at 32,
    /// flags at 36, status at 40.
    R535,
}

impl Layout {
    /// The family of a driver version such as `535.54.03`.
    pub fn of_version(version: &str) -> Layout {
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("{version:?} is not a driver version"));
        match major {
            ..515 => panic!("driver {version}: the stand-in has no layout before 515"),
            515..525 => Layout::R515,
            525..535 => Layout::R525,
            _ => Layout::R535,
        }
    }

    /// The size of NVOS64 in this family.
    pub fn nvos64_len(self) -> usize {
        match self {
            Layout::R535 => 48,
            _ => 40,
        }
    }

    /// Where `paramsSize` lies in NVOS21 and NVOS64, for the families that have it.
    fn params_size_offsets(self) -> Option<(usize, usize)> {
        (self == Layout::R535).then_some((24, 32))
    }

    /// Where RM writes `status` in the block of escape `nr` that is `len` bytes long; None
    /// for a block this family does not have.
    pub fn status_offset(self, nr: u32, len: usize) -> Option<usize> {
        use escape::*;
        match (nr, len) {
            (RM_FREE, 16) => Some(12),
            (RM_DUP_OBJECT, 28) => Some(24),
            (RM_VID_HEAP_CONTROL, 184) => Some(20),
            (RM_ALLOC_MEMORY, 56) => Some(40),
            (RM_ALLOC, 32) => Some(if self == Layout::R535 { 28 } else { 24 }),
            (RM_ALLOC, n) if n == self.nvos64_len() => Some(match self {
                Layout::R515 => 32,
                Layout::R525 => 36,
                Layout::R535 => 40,
            }),
            _ => None,
        }
    }
}

/// Where the handle of the object a block makes, frees or shares lies: `hObjectNew`,
/// `hObjectOld` and `hObject` at 8, NVOS32's `hMemory` at 44.
pub fn object_offset(nr: u32) -> usize {
    if nr == escape::RM_VID_HEAP_CONTROL {
        44
    } else {
        8
    }
}

fn read32(block: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(block[at..at + 4].try_into().expect("4 bytes"))
}

fn write32(block: &mut [u8], at: usize, value: u32) {
    block[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn write64(block: &mut [u8], at: usize, value: u64) {
    block[at..at + 8].copy_from_slice(&value.to_ne_bytes());
}

/// The stand-in for RM: answers the escapes of one driver family, refusing the objects whose
/// handles it was given. Mounted by [`FakeNodes::mount`].
pub struct FakeDriver {
    layout: Layout,
    refused: HashSet<u32>,
    next_client: AtomicU32,
}

impl FakeDriver {
    /// RM of the `layout` family, which refuses with `NV_ERR_NO_MEMORY` every escape whose
    /// object handle ([`object_offset`]) is in `refused`.
    pub fn new(layout: Layout, refused: &[u32]) -> FakeDriver {
        FakeDriver {
            layout,
            refused: refused.iter().copied().collect(),
            next_client: AtomicU32::new(FIRST_CLIENT),
        }
    }

    /// RM's answer to the escape `cmd` whose block is `block`: the block to copy back, with
    /// `status` written; None (the driver's `ENOTTY`) for a command that is not a fixed-size
    /// RM escape of this family.
    pub fn answer(&self, cmd: u32, block: &[u8]) -> Option<Vec<u8>> {
        let (dir, size, magic, nr) = (
            cmd >> 30,
            (cmd >> 16) & 0x3fff,
            (cmd >> 8) & 0xff,
            cmd & 0xff,
        );
        if dir != 3 || magic != MAGIC || size as usize != block.len() {
            return None;
        }
        let status_at = self.layout.status_offset(nr, block.len())?;
        let mut out = block.to_vec();
        let object_at = object_offset(nr);
        let status = if self.refused.contains(&read32(&out, object_at)) {
            NV_ERR_NO_MEMORY
        } else {
            NV_OK
        };
        // A client allocated with handle 0 gets one from RM (hObjectNew is in/out).
        let new_client = nr == escape::RM_ALLOC && read32(&out, 12) == class::ROOT_CLIENT;
        if status == NV_OK && new_client && read32(&out, object_at) == 0 {
            let handle = self.next_client.fetch_add(1, Ordering::Relaxed);
            write32(&mut out, object_at, handle);
        }
        write32(&mut out, status_at, status);
        Some(out)
    }
}

/// The device files of the stand-in, in the order of their inode numbers (2, 3…).
pub const NODES: [&str; 4] = ["nvidiactl", "nvidia0", "nvidia1", "nvidia-uvm"];

/// How long the kernel may cache the stand-in's attributes and names (they never change).
const TTL: Duration = Duration::from_secs(3600);

fn node_attr(ino: INodeNo) -> Option<FileAttr> {
    let kind = match ino.0 {
        1 => FileType::Directory,
        n if (2..2 + NODES.len() as u64).contains(&n) => FileType::RegularFile,
        _ => return None,
    };
    Some(FileAttr {
        ino,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: if kind == FileType::Directory {
            0o755
        } else {
            0o666
        },
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    })
}

impl Filesystem for FakeDriver {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ino = NODES.iter().position(|n| OsStr::new(n) == name);
        match ino.filter(|_| parent == INodeNo::ROOT) {
            Some(i) => {
                let attr = node_attr(INodeNo(i as u64 + 2)).expect("a node");
                reply.entry(&TTL, &attr, Generation(0));
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match node_attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        match self.answer(cmd, in_data) {
            Some(out) => reply.ioctl(0, &out),
            None => reply.error(Errno::ENOTTY),
        }
    }
}

/// Fails the test, with what to do, unless this host can mount FUSE filesystems.
pub fn require_fuse() {
    let listed = std::fs::read_to_string("/proc/filesystems").is_ok_and(|t| {
        t.lines()
            .any(|l| l.split_whitespace().last() == Some("fuse"))
    });
    assert!(
        listed && Path::new("/dev/fuse").exists(),
        "the GPU tests simulate the NVIDIA driver with a FUSE file, and this host has no FUSE \
         (/dev/fuse: {}, fuse in /proc/filesystems: {listed}): `modprobe fuse`. They do not \
         skip.",
        Path::new("/dev/fuse").exists()
    );
}

/// A [`FakeDriver`] mounted on a scratch directory of the test's: its [`NODES`] are there
/// until this is dropped.
pub struct FakeNodes {
    pub dir: PathBuf,
    _session: BackgroundSession,
}

impl FakeNodes {
    /// Mounts `driver` with mount(2), as root, on a new scratch directory named after `name`.
    pub fn mount(name: &str, driver: FakeDriver) -> FakeNodes {
        require_fuse();
        let dir = scratch_dir(&format!("{name}-nodes"));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("infermem-fake-nvidia".to_owned()),
            MountOption::NoExec,
        ];
        let session = fuser::spawn_mount(driver, &dir, &config)
            .unwrap_or_else(|e| panic!("mounting the stand-in driver on {}: {e}", dir.display()));
        FakeNodes {
            dir,
            _session: session,
        }
    }
}

impl Drop for FakeNodes {
    fn drop(&mut self) {
        // Detached, so that a test program still holding a node cannot keep it mounted here
        // (the session's own unmount then finds nothing left to do).
        if let Ok(path) = CString::new(self.dir.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The parameter structure `NV_ESC_RM_ALLOC` is called with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// NVOS21 (32 bytes).
    Nvos21,
    /// NVOS64 (40 or 48 bytes: [`Layout::nvos64_len`]).
    Nvos64,
}

/// What an `NV_ESC_RM_ALLOC` passes in its allocation parameters (`pAllocParms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Params {
    /// Nothing the agent reads (a client, a subdevice, an unknown class).
    Empty,
    /// `NV0080_ALLOC_PARAMETERS.deviceId` (at 0), for a device.
    Device(u32),
    /// `NV_MEMORY_ALLOCATION_PARAMS.size` (at 64), for memory.
    Size(u64),
}

/// `NVOS32_FUNCTION_ALLOC_SIZE` and `NVOS32_FUNCTION_FREE`.
const NVOS32_ALLOC_SIZE: u32 = 2;
const NVOS32_FREE: u32 = 3;
/// `NVOS32_ALLOC_FLAGS_MEMORY_HANDLE_PROVIDED` and `NVOS32_ALLOC_FLAGS_VIRTUAL`.
const NVOS32_HANDLE_PROVIDED: u32 = 0x4000;
const NVOS32_VIRTUAL: u32 = 0x8_0000;
/// Bytes of the allocation parameters' buffer (the probes copy 128).
const ALLOC_PARAMS_LEN: usize = 128;

/// One RM escape of a script: one `ioctl`. Handles are the caller's (RM takes them as given),
/// except a client's when 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `NV_ESC_RM_ALLOC` of `class` as `handle` under `parent`, on `/dev/nvidiactl`.
    Alloc {
        api: Api,
        client: u32,
        parent: u32,
        handle: u32,
        class: u32,
        params: Params,
    },
    /// `NV_ESC_RM_VID_HEAP_CONTROL`, ALLOC_SIZE of `size` bytes of video memory (location
    /// VIDMEM); `virtual_only`: with `NVOS32_ALLOC_FLAGS_VIRTUAL` (an address range only).
    VidHeapAlloc {
        client: u32,
        parent: u32,
        handle: u32,
        size: u64,
        virtual_only: bool,
    },
    /// `NV_ESC_RM_VID_HEAP_CONTROL`, FREE of `handle`.
    VidHeapFree {
        client: u32,
        parent: u32,
        handle: u32,
    },
    /// `NV_ESC_RM_ALLOC_MEMORY` on `/dev/nvidia<device>` of `class` over `size` bytes of this
    /// process's memory (`limit` = size - 1).
    AllocMemory {
        device: u32,
        client: u32,
        parent: u32,
        handle: u32,
        class: u32,
        size: u64,
    },
    /// `NV_ESC_RM_FREE` of `handle` (a client's own handle frees the client).
    Free {
        client: u32,
        parent: u32,
        handle: u32,
    },
    /// `NV_ESC_RM_DUP_OBJECT`: `handle` under `parent` becomes another reference to
    /// `src_handle` of `src_client`.
    Dup {
        client: u32,
        parent: u32,
        handle: u32,
        src_client: u32,
        src_handle: u32,
    },
}

impl fmt::Display for Step {
    /// One line of a script, as [`Step::from_str`] reads it (handles and classes in hex).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Step::Alloc {
                api,
                client,
                parent,
                handle,
                class,
                params,
            } => {
                let api = if api == Api::Nvos21 {
                    "nvos21"
                } else {
                    "nvos64"
                };
                write!(
                    f,
                    "alloc {api} {client:#x} {parent:#x} {handle:#x} {class:#x}"
                )?;
                match params {
                    Params::Empty => Ok(()),
                    Params::Device(id) => write!(f, " device {id}"),
                    Params::Size(size) => write!(f, " size {size}"),
                }
            }
            Step::VidHeapAlloc {
                client,
                parent,
                handle,
                size,
                virtual_only,
            } => {
                let flag = if virtual_only { " virtual" } else { "" };
                write!(
                    f,
                    "vidheap-alloc {client:#x} {parent:#x} {handle:#x} {size}{flag}"
                )
            }
            Step::VidHeapFree {
                client,
                parent,
                handle,
            } => {
                write!(f, "vidheap-free {client:#x} {parent:#x} {handle:#x}")
            }
            Step::AllocMemory {
                device,
                client,
                parent,
                handle,
                class,
                size,
            } => write!(
                f,
                "alloc-memory {device} {client:#x} {parent:#x} {handle:#x} {class:#x} {size}"
            ),
            Step::Free {
                client,
                parent,
                handle,
            } => {
                write!(f, "free {client:#x} {parent:#x} {handle:#x}")
            }
            Step::Dup {
                client,
                parent,
                handle,
                src_client,
                src_handle,
            } => write!(
                f,
                "dup {client:#x} {parent:#x} {handle:#x} {src_client:#x} {src_handle:#x}"
            ),
        }
    }
}

/// A number of a script line: `0x…` hex or decimal.
fn number(word: Option<&&str>) -> Result<u64, String> {
    let word = word.ok_or("a number is missing")?;
    let parsed = match word.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => word.parse(),
    };
    parsed.map_err(|e| format!("{word:?}: {e}"))
}

fn handle(word: Option<&&str>) -> Result<u32, String> {
    let value = number(word)?;
    u32::try_from(value).map_err(|_| format!("{value:#x} is not a 32-bit handle"))
}

/// The parameters an `alloc` line ends with: nothing, `device ID` or `size BYTES`.
fn alloc_params(words: &[&str]) -> Result<Params, String> {
    match words {
        [] => Ok(Params::Empty),
        ["device", id] => Ok(Params::Device(handle(Some(id))?)),
        ["size", size] => Ok(Params::Size(number(Some(size))?)),
        other => Err(format!("{other:?}: expected `device ID` or `size BYTES`")),
    }
}

impl FromStr for Step {
    type Err = String;

    /// Reads a line written by [`Step`]'s `Display`.
    fn from_str(line: &str) -> Result<Step, String> {
        let w: Vec<&str> = line.split_whitespace().collect();
        let h = |i: usize| handle(w.get(i));
        let step = match w.first().copied() {
            Some("alloc") => Step::Alloc {
                api: match w.get(1).copied() {
                    Some("nvos21") => Api::Nvos21,
                    Some("nvos64") => Api::Nvos64,
                    other => return Err(format!("{other:?} is not nvos21 or nvos64")),
                },
                client: h(2)?,
                parent: h(3)?,
                handle: h(4)?,
                class: h(5)?,
                params: alloc_params(w.get(6..).unwrap_or_default())?,
            },
            Some("vidheap-alloc") => Step::VidHeapAlloc {
                client: h(1)?,
                parent: h(2)?,
                handle: h(3)?,
                size: number(w.get(4))?,
                virtual_only: w.get(5) == Some(&"virtual"),
            },
            Some("vidheap-free") => Step::VidHeapFree {
                client: h(1)?,
                parent: h(2)?,
                handle: h(3)?,
            },
            Some("alloc-memory") => Step::AllocMemory {
                device: h(1)?,
                client: h(2)?,
                parent: h(3)?,
                handle: h(4)?,
                class: h(5)?,
                size: number(w.get(6))?,
            },
            Some("free") => Step::Free {
                client: h(1)?,
                parent: h(2)?,
                handle: h(3)?,
            },
            Some("dup") => Step::Dup {
                client: h(1)?,
                parent: h(2)?,
                handle: h(3)?,
                src_client: h(4)?,
                src_handle: h(5)?,
            },
            _ => return Err(format!("{line:?} is not a step")),
        };
        // Every word must have been read: the line is what the step writes.
        let written = step.to_string();
        if written.split_whitespace().count() != w.len() {
            return Err(format!(
                "{line:?} has words that are not part of {written:?}"
            ));
        }
        Ok(step)
    }
}

/// A zeroed block of `len` bytes starting with `words` (handles, class or function).
fn block_with(len: usize, words: &[u32]) -> Vec<u8> {
    let mut block = vec![0; len];
    for (i, &word) in words.iter().enumerate() {
        write32(&mut block, 4 * i, word);
    }
    block
}

impl Step {
    /// The escape number and the parameter block, laid out for `layout`: `alloc_params` is
    /// the address of the allocation parameters, `memory` that of the pages an
    /// `NV_ESC_RM_ALLOC_MEMORY` describes, `ctl` the `/dev/nvidiactl` fd it names.
    fn block(&self, layout: Layout, alloc_params: u64, memory: u64, ctl: RawFd) -> (u32, Vec<u8>) {
        use escape::*;
        match *self {
            Step::Alloc {
                api,
                client,
                parent,
                handle,
                class,
                ..
            } => {
                let sizes = layout.params_size_offsets();
                let (len, params_size_at) = match api {
                    Api::Nvos21 => (32, sizes.map(|s| s.0)),
                    Api::Nvos64 => (layout.nvos64_len(), sizes.map(|s| s.1)),
                };
                let mut block = block_with(len, &[client, parent, handle, class]);
                write64(&mut block, 16, alloc_params);
                if let Some(at) = params_size_at {
                    // RM ignores it (it sizes the parameters by class); callers fill it.
                    write32(&mut block, at, ALLOC_PARAMS_LEN as u32);
                }
                (RM_ALLOC, block)
            }
            Step::VidHeapAlloc {
                client,
                parent,
                handle,
                size,
                virtual_only,
            } => {
                let mut block = block_with(184, &[client, parent, NVOS32_ALLOC_SIZE]);
                write32(&mut block, 44, handle);
                let virtual_flag = if virtual_only { NVOS32_VIRTUAL } else { 0 };
                write32(&mut block, 52, NVOS32_HANDLE_PROVIDED | virtual_flag);
                // attr (56) stays 0: LOCATION (bits 26:25) VIDMEM.
                write64(&mut block, 88, size);
                (RM_VID_HEAP_CONTROL, block)
            }
            Step::VidHeapFree {
                client,
                parent,
                handle,
            } => {
                let mut block = block_with(184, &[client, parent, NVOS32_FREE]);
                write32(&mut block, 44, handle);
                (RM_VID_HEAP_CONTROL, block)
            }
            Step::AllocMemory {
                client,
                parent,
                handle,
                class,
                size,
                ..
            } => {
                let mut block = block_with(56, &[client, parent, handle, class]);
                write64(&mut block, 24, memory);
                write64(&mut block, 32, size - 1);
                write32(&mut block, 48, ctl as u32);
                (RM_ALLOC_MEMORY, block)
            }
            Step::Free {
                client,
                parent,
                handle,
            } => (RM_FREE, block_with(16, &[client, parent, handle])),
            Step::Dup {
                client,
                parent,
                handle,
                src_client,
                src_handle,
            } => (
                RM_DUP_OBJECT,
                block_with(28, &[client, parent, handle, src_client, src_handle]),
            ),
        }
    }

    /// The allocation parameters of an `alloc` step (zeroes for the others).
    fn alloc_params(&self) -> [u8; ALLOC_PARAMS_LEN] {
        let mut params = [0; ALLOC_PARAMS_LEN];
        match self {
            Step::Alloc {
                params: Params::Device(id),
                ..
            } => write32(&mut params, 0, *id),
            Step::Alloc {
                params: Params::Size(size),
                ..
            } => write64(&mut params, 64, *size),
            _ => {}
        }
        params
    }

    /// Makes this step's `ioctl` on `fds` (`/dev/nvidia<device>` for `alloc-memory`,
    /// `/dev/nvidiactl` for the others) and reads RM's answer from the block.
    pub fn perform(&self, layout: Layout, fds: &DeviceFds) -> Outcome {
        let alloc_params = self.alloc_params();
        // The pages an OS descriptor describes stay this process's, as pinned pages would.
        let memory = match *self {
            Step::AllocMemory { size, .. } => Vec::leak(vec![1u8; size as usize]).as_ptr() as u64,
            _ => 0,
        };
        let (nr, mut block) = self.block(layout, alloc_params.as_ptr() as u64, memory, fds.ctl());
        let fd = match *self {
            Step::AllocMemory { device, .. } => fds.device(device),
            _ => fds.ctl(),
        };
        // SAFETY: `block` has the size the command encodes; the memory its pointers name
        // (`alloc_params`, `memory`) outlives the call.
        let ret = unsafe { libc::ioctl(fd, iowr(nr, block.len()) as _, block.as_mut_ptr()) };
        let errno = if ret < 0 {
            std::io::Error::last_os_error().raw_os_error()
        } else {
            None
        };
        let status_at = layout
            .status_offset(nr, block.len())
            .expect("a block of this family");
        Outcome {
            ret,
            errno: errno.unwrap_or(0),
            status: read32(&block, status_at),
            handle: read32(&block, object_offset(nr)),
        }
    }
}

/// What one step's `ioctl` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The syscall's return value (0 even when RM refused).
    pub ret: i32,
    /// `errno` when `ret` < 0.
    pub errno: i32,
    /// RM's `status` in the block after the call.
    pub status: u32,
    /// The object's handle in the block after the call (a new client's, for a client).
    pub handle: u32,
}

impl Outcome {
    /// The JSON line the test program prints for `step`.
    pub fn json(&self, step: &Step) -> String {
        format!(
            r#"{{"event":"step","step":"{step}","ret":{},"errno":{},"status":{},"handle":{}}}"#,
            self.ret, self.errno, self.status, self.handle
        )
    }
}

/// The device nodes a test program opened, in [`NODES`]' order.
pub struct DeviceFds {
    fds: Vec<RawFd>,
}

impl DeviceFds {
    /// Opens `/dev/<node>` for every one of [`NODES`] with open(2) (`O_RDWR | O_CLOEXEC`),
    /// as the CUDA driver opens them. The paths are the ones the probes recognise.
    pub fn open() -> DeviceFds {
        let fds = NODES
            .iter()
            .map(|node| {
                let path = CString::new(format!("/dev/{node}")).expect("no NUL");
                // SAFETY: a valid NUL-terminated path.
                let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
                assert!(
                    fd >= 0,
                    "open /dev/{node}: {}",
                    std::io::Error::last_os_error()
                );
                fd
            })
            .collect();
        DeviceFds { fds }
    }

    fn ctl(&self) -> RawFd {
        self.fds[0]
    }

    /// `/dev/nvidia<device>`'s fd.
    fn device(&self, device: u32) -> RawFd {
        let devices = &self.fds[1..NODES.len() - 1];
        *devices.get(device as usize).unwrap_or_else(|| {
            panic!(
                "the stand-in has /dev/nvidia0 to /dev/nvidia{}",
                devices.len() - 1
            )
        })
    }

    /// `{"nvidiactl":3,…}`: each node's fd.
    pub fn json(&self) -> String {
        let fields: Vec<String> = NODES
            .iter()
            .zip(&self.fds)
            .map(|(node, fd)| format!(r#""{node}":{fd}"#))
            .collect();
        format!("{{{}}}", fields.join(","))
    }
}

/// The test program (`workload nvidia-script`) making scripted escapes through a
/// [`FakeNodes`]: each [`Script::run`] is one `ioctl`.
pub struct Script {
    talker: Talker,
    /// The program's pid.
    pub pid: u32,
}

impl Script {
    /// Starts the program on `nodes`, with blocks laid out for driver `version`, and waits
    /// until it has opened the device nodes.
    pub fn start(nodes: &FakeNodes, version: &str) -> Script {
        let mut cmd = Command::new(workload_bin());
        cmd.arg("nvidia-script").arg(&nodes.dir).arg(version);
        let mut talker = Talker::spawn(cmd);
        let opened = talker.expect_event("opened");
        let pid = opened["pid"].as_u64().expect("the program's pid") as u32;
        assert_eq!(pid, talker.pid(), "{opened}");
        Script { talker, pid }
    }

    /// Makes `step`'s ioctl: it must return 0 with RM's `status` as given. Returns the handle
    /// the block holds after the call (a new client's handle, for a client).
    pub fn run(&mut self, step: Step, status: u32) -> u32 {
        self.talker.send_line(&step.to_string());
        let outcome = self.talker.expect_event("step");
        assert_eq!(outcome["step"], step.to_string(), "{outcome}");
        assert_eq!(outcome["ret"], 0, "the ioctl failed: {outcome}");
        assert_eq!(outcome["status"], status, "RM's status: {outcome}");
        outcome["handle"].as_u64().expect("a handle") as u32
    }

    /// [`Script::run`] of a step RM accepts.
    pub fn ok(&mut self, step: Step) -> u32 {
        self.run(step, NV_OK)
    }

    /// Closes the program's stdin; it exits (closing its nodes) and is reaped.
    pub fn finish(self) -> ExitStatus {
        self.talker.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUTS: [Layout; 3] = [Layout::R515, Layout::R525, Layout::R535];

    /// One step of every kind, with every kind of allocation parameters.
    fn every_step() -> Vec<Step> {
        let alloc = |api, class, params| Step::Alloc {
            api,
            client: FIRST_CLIENT,
            parent: 0xd0,
            handle: 0x100,
            class,
            params,
        };
        vec![
            alloc(Api::Nvos21, class::ROOT_CLIENT, Params::Empty),
            alloc(Api::Nvos21, class::DEVICE, Params::Device(1)),
            alloc(
                Api::Nvos64,
                class::MEMORY_LOCAL_USER,
                Params::Size(64 << 20),
            ),
            Step::VidHeapAlloc {
                client: 1,
                parent: 2,
                handle: 3,
                size: 4 << 20,
                virtual_only: true,
            },
            Step::VidHeapFree {
                client: 1,
                parent: 2,
                handle: 3,
            },
            Step::AllocMemory {
                device: 1,
                client: 1,
                parent: 2,
                handle: 3,
                class: class::OS_DESCRIPTOR,
                size: 2 << 20,
            },
            Step::Free {
                client: 1,
                parent: 1,
                handle: 1,
            },
            Step::Dup {
                client: 1,
                parent: 2,
                handle: 3,
                src_client: 4,
                src_handle: 5,
            },
        ]
    }

    #[test]
    fn every_step_is_one_line_read_back_as_itself() {
        for step in every_step() {
            let line = step.to_string();
            assert_eq!(line.parse::<Step>(), Ok(step), "{line}");
            assert!(
                format!("{line} 7").parse::<Step>().is_err(),
                "{line} with a word more"
            );
        }
        assert!("alloc nvos32 1 2 3 0x40".parse::<Step>().is_err());
        assert!("free 1 2 0x1_0000_0000".parse::<Step>().is_err());
        assert!("alloc nvos21 1 2 3 0x40 size".parse::<Step>().is_err());
    }

    #[test]
    fn the_stand_in_echoes_each_block_with_the_status_where_its_family_puts_it() {
        for layout in LAYOUTS {
            let driver = FakeDriver::new(layout, &[]);
            for step in every_step() {
                let (nr, block) = step.block(layout, 0x7f00_0000_1000, 0x7f00_0000_2000, 3);
                let mut sent = block.clone();
                let status_at = layout.status_offset(nr, block.len()).expect("a status");
                write32(&mut sent, status_at, 0xffff_ffff);
                let back = driver
                    .answer(iowr(nr, sent.len()), &sent)
                    .expect("an answer");
                assert_eq!(read32(&back, status_at), NV_OK, "{layout:?} {step}");
                assert_eq!(back, block, "{layout:?} {step}: only the status changes");
            }
        }
    }

    #[test]
    fn the_stand_in_makes_clients_and_refuses_the_handles_it_was_given() {
        let driver = FakeDriver::new(Layout::R535, &[0x100]);
        let client = |h| Step::Alloc {
            api: Api::Nvos21,
            client: 0,
            parent: 0,
            handle: h,
            class: class::ROOT_CLIENT,
            params: Params::Empty,
        };
        let answer = |step: Step| {
            let (nr, block) = step.block(Layout::R535, 0, 0, 3);
            driver
                .answer(iowr(nr, block.len()), &block)
                .expect("an answer")
        };
        let first = answer(client(0));
        assert_eq!(
            (read32(&first, 8), read32(&first, 28)),
            (FIRST_CLIENT, NV_OK)
        );
        assert_eq!(read32(&answer(client(0)), 8), FIRST_CLIENT + 1);
        assert_eq!(
            read32(&answer(client(0x42)), 8),
            0x42,
            "a handle given is kept"
        );
        let refused = answer(Step::VidHeapAlloc {
            client: 1,
            parent: 2,
            handle: 0x100,
            size: 1 << 20,
            virtual_only: false,
        });
        assert_eq!(read32(&refused, 20), NV_ERR_NO_MEMORY);
    }

    #[test]
    fn the_stand_in_answers_only_the_fixed_size_escapes_of_its_family() {
        let driver = FakeDriver::new(Layout::R525, &[]);
        let block = [0u8; 48];
        // NVOS64 of 535 on a 525 driver; a size the command does not encode; not 'F'; _IOR.
        assert_eq!(driver.answer(iowr(escape::RM_ALLOC, 48), &block), None);
        assert_eq!(driver.answer(iowr(escape::RM_ALLOC, 40), &block), None);
        assert_eq!(
            driver.answer(iowr(escape::RM_ALLOC, 48) & !0xff00 | 0x4700, &block),
            None
        );
        assert_eq!(
            driver.answer(iowr(escape::RM_FREE, 16) & !0x4000_0000, &block[..16]),
            None
        );
        assert!(
            driver
                .answer(iowr(escape::RM_ALLOC, 40), &block[..40])
                .is_some()
        );
    }

    #[test]
    fn driver_versions_fall_in_their_families() {
        assert_eq!(Layout::of_version("515.43.04"), Layout::R515);
        assert_eq!(Layout::of_version("525.60.13"), Layout::R525);
        assert_eq!(Layout::of_version("530.30.02"), Layout::R525);
        assert_eq!(Layout::of_version("535.54.03"), Layout::R535);
        assert_eq!(Layout::of_version("570.86.15"), Layout::R535);
        assert_eq!(
            iowr(escape::RM_ALLOC, 48),
            0xc030_462b,
            "the doc's full command"
        );
        assert_eq!(iowr(escape::RM_VID_HEAP_CONTROL, 184), 0xc0b8_464a);
    }
}
