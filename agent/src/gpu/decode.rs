//! One [`GpuIoctl`] record (an RM escape that succeeded at the syscall level) into an
//! [`RmCall`], read with the running driver's [`Layout`].
//!
//! Every byte comes from an untrusted process: every read is bounded by what was copied, a
//! size that disagrees with the driver's is "not decoded", and nothing here panics.
//! The offsets that never moved between 515 and 595 are the constants below (checked by
//! compiling every release tag's headers, as for [`crate::gpu::layout`]).

use infermem_common::GpuIoctl;

use super::layout::{Layout, RmAllocLayout};

/// `NV_IOCTL_MAGIC` ('F'), the type byte of every RM escape's command.
const NV_IOCTL_MAGIC: u32 = b'F' as u32;

/// RM escapes the probes send (nv_escape.h), by their command number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// `NV_ESC_RM_ALLOC_MEMORY` (0x27): `nv_ioctl_nvos02_parameters_with_fd`, on /dev/nvidiaN.
    AllocMemory,
    /// `NV_ESC_RM_FREE` (0x29): `NVOS00_PARAMETERS`.
    Free,
    /// `NV_ESC_RM_ALLOC` (0x2b): `NVOS21_PARAMETERS` or `NVOS64_PARAMETERS`.
    Alloc,
    /// `NV_ESC_RM_DUP_OBJECT` (0x34): `NVOS55_PARAMETERS`.
    DupObject,
    /// `NV_ESC_RM_VID_HEAP_CONTROL` (0x4a): `NVOS32_PARAMETERS`.
    VidHeapControl,
}

impl Escape {
    /// The escape of an ioctl command number, if it is one this decoder reads.
    pub const fn from_nr(nr: u32) -> Option<Escape> {
        Some(match nr {
            0x27 => Escape::AllocMemory,
            0x29 => Escape::Free,
            0x2b => Escape::Alloc,
            0x34 => Escape::DupObject,
            0x4a => Escape::VidHeapControl,
            _ => return None,
        })
    }
}

/// RM class ids (src/common/sdk/nvidia/inc/class/*.h, nvos.h), the same in 515 to 595.
pub mod class {
    /// `NV01_ROOT`, `NV01_ROOT_NON_PRIV`, `NV01_ROOT_CLIENT`: an RM client.
    pub const ROOTS: [u32; 3] = [0x0, 0x1, 0x41];
    /// `NV01_DEVICE_0` (NV0080_ALLOC_PARAMETERS: deviceId at 0).
    pub const DEVICE: u32 = 0x80;
    /// `NV20_SUBDEVICE_0`.
    pub const SUBDEVICE: u32 = 0x2080;
    /// `NV01_MEMORY_SYSTEM`: host memory (NV_MEMORY_ALLOCATION_PARAMS).
    pub const MEMORY_SYSTEM: u32 = 0x3e;
    /// `NV01_MEMORY_LOCAL_USER`: video memory (NV_MEMORY_ALLOCATION_PARAMS).
    pub const MEMORY_LOCAL_USER: u32 = 0x40;
    /// `NV_MEMORY_EXTENDED_USER`: EGM memory (made by 550–590 vid-heap calls with USE_EGM).
    pub const MEMORY_EXTENDED_USER: u32 = 0x42;
    /// `NV01_MEMORY_VIRTUAL` (= `NV01_MEMORY_SYSTEM_DYNAMIC`): an address range only.
    pub const MEMORY_VIRTUAL: u32 = 0x70;
    /// `NV01_MEMORY_SYSTEM_OS_DESCRIPTOR`: pinned user pages
    /// (NV_OS_DESC_MEMORY_ALLOCATION_PARAMS: limit at 24).
    pub const MEMORY_OS_DESCRIPTOR: u32 = 0x71;
    /// `NV50_MEMORY_VIRTUAL`: an address range only.
    pub const NV50_MEMORY_VIRTUAL: u32 = 0x50a0;

    /// Classes known to hold no memory of their own, sorted. Memory classes that cannot be
    /// sized (fabric 0xf8/0xf9/0xfb/0xfd, export 0xe0, physical view 0xc2, lists 0x81–0x83,
    /// privileged 0x3f, console 0x76, HW resources 0xb1, deviceless 0x90ce, EGM 0x42…) are
    /// deliberately absent: they are counted as unknown.
    pub const SIZELESS: &[u32] = &[
        0x0002, // NV01_CONTEXT_DMA
        0x0004, // NV01_TIMER
        0x0005, // NV01_EVENT
        0x0070, // NV01_MEMORY_VIRTUAL
        0x0078, // NV01_EVENT_KERNEL_CALLBACK
        0x0079, // NV01_EVENT_OS_EVENT
        0x007e, // NV01_EVENT_KERNEL_CALLBACK_EX
        0x00da, // NV_SEMAPHORE_SURFACE
        0x2080, // NV20_SUBDEVICE_0
        0x2081, // NV2081_BINAPI
        0x208f, // NV20_SUBDEVICE_DIAG
        0x503b, // NV50_P2P
        0x503c, // NV50_THIRD_PARTY_P2P
        0x5080, // NV50_DEFERRED_API_CLASS
        0x50a0, // NV50_MEMORY_VIRTUAL
        0x83de, // GT200_DEBUGGER
        0x9067, // FERMI_CONTEXT_SHARE_A
        0x90f1, // FERMI_VASPACE_A
        0xa06c, // KEPLER_CHANNEL_GROUP_A
        0xb069, // MAXWELL_FAULT_BUFFER_A
        0xb06f, // MAXWELL_CHANNEL_GPFIFO_A
        0xc06f, // PASCAL_CHANNEL_GPFIFO_A
        0xc076, // GP100_UVM_SW
        0xc0b5, // PASCAL_DMA_COPY_A
        0xc0c0, // PASCAL_COMPUTE_A
        0xc1b5, // PASCAL_DMA_COPY_B
        0xc1c0, // PASCAL_COMPUTE_B
        0xc361, // VOLTA_USERMODE_A
        0xc365, // ACCESS_COUNTER_NOTIFY_BUFFER
        0xc369, // MMU_FAULT_BUFFER
        0xc36f, // VOLTA_CHANNEL_GPFIFO_A
        0xc3b5, // VOLTA_DMA_COPY_A
        0xc3c0, // VOLTA_COMPUTE_A
        0xc461, // TURING_USERMODE_A
        0xc46f, // TURING_CHANNEL_GPFIFO_A
        0xc561, // AMPERE_USERMODE_A
        0xc56f, // AMPERE_CHANNEL_GPFIFO_A
        0xc5b5, // TURING_DMA_COPY_A
        0xc5c0, // TURING_COMPUTE_A
        0xc661, // HOPPER_USERMODE_A
        0xc6b5, // AMPERE_DMA_COPY_A
        0xc6c0, // AMPERE_COMPUTE_A
        0xc761, // BLACKWELL_USERMODE_A
        0xc7b5, // AMPERE_DMA_COPY_B
        0xc7c0, // AMPERE_COMPUTE_B
        0xc86f, // HOPPER_CHANNEL_GPFIFO_A
        0xc8b5, // HOPPER_DMA_COPY_A
        0xc96f, // BLACKWELL_CHANNEL_GPFIFO_A
        0xc9b5, // BLACKWELL_DMA_COPY_A
        0xc9c0, // ADA_COMPUTE_A
        0xca6f, // BLACKWELL_CHANNEL_GPFIFO_B
        0xcab5, // BLACKWELL_DMA_COPY_B
        0xcb33, // NV_CONFIDENTIAL_COMPUTE
        0xcbc0, // HOPPER_COMPUTE_A
        0xcdc0, // BLACKWELL_COMPUTE_A
        0xcec0, // BLACKWELL_COMPUTE_B
    ];
}

/// Where a memory object's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Video memory.
    Vram,
    /// Host memory allocated by or registered with the driver (pinned pages).
    Host,
}

/// What a new RM object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A device (`NV01_DEVICE_0`): `device_id` from its alloc params, None if unreadable.
    Device { device_id: Option<u32> },
    /// Memory of a known size.
    Memory { placement: Placement, bytes: u64 },
    /// A known class that holds no memory of its own (subdevice, address space, channel…).
    Sizeless,
    /// A class this decoder does not know, or memory it cannot size: counted by class.
    Unknown,
}

/// Which escape made an object (the device fallback of [`crate::gpu::objects`] depends on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocPath {
    RmAlloc,
    VidHeap,
    AllocMemory,
}

/// A new object `handle` of `client`, under `parent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectAlloc {
    pub client: u32,
    pub parent: u32,
    pub handle: u32,
    pub class: u32,
    pub kind: ObjectKind,
    pub path: AllocPath,
}

/// A new handle (`client`, `handle`) under `parent`, for the object (`src_client`,
/// `src_handle`): a second reference, not new memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dup {
    pub client: u32,
    pub parent: u32,
    pub handle: u32,
    pub src_client: u32,
    pub src_handle: u32,
}

/// What one RM call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RmCall {
    /// A new RM client (`NV01_ROOT*`); `client` is the handle the driver wrote back.
    ClientAlloc { client: u32, class: u32 },
    /// A new object (RM_ALLOC, vid-heap allocation, or RM_ALLOC_MEMORY).
    Alloc(ObjectAlloc),
    /// RM_FREE or a vid-heap FREE of `handle`; `handle == client` frees the whole client.
    Free {
        client: u32,
        parent: u32,
        handle: u32,
    },
    /// RM_DUP_OBJECT.
    Dup(Dup),
    /// A vid-heap query that changes no object (INFO, compression, alignment, HW_FREE).
    Untracked { function: u32 },
    /// RM refused the call (`status` non-zero): nothing changed.
    Refused { escape: Escape, status: u32 },
    /// The record could not be decoded.
    NotDecoded(NotDecoded),
}

/// Why a record was not decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotDecoded {
    #[error("the ioctl failed ({0})")]
    IoctlFailed(i32),
    #[error("command {0:#x} is not an RM escape the decoder reads")]
    UnknownCommand(u32),
    #[error("{escape:?}: the command's size {size} is not this driver's")]
    UnexpectedSize { escape: Escape, size: usize },
    #[error("{escape:?}: {len} parameter bytes copied, {need} needed")]
    ShortParams {
        escape: Escape,
        len: usize,
        need: usize,
    },
    #[error("class {class:#x}: {len} allocation parameter bytes copied, {need} needed")]
    ShortAllocParams { class: u32, len: usize, need: usize },
    #[error("vid-heap function {0} is not decoded")]
    VidHeapFunction(u32),
}

/// `NVOS00_PARAMETERS` (RM_FREE): hRoot 0, hObjectParent 4, hObjectOld 8, status 12.
const NVOS00_SIZE: usize = 16;
/// `NVOS55_PARAMETERS` (RM_DUP_OBJECT): hClient 0, hParent 4, hObject 8, hClientSrc 12,
/// hObjectSrc 16, flags 20, status 24.
const NVOS55_SIZE: usize = 28;
/// `nv_ioctl_nvos02_parameters_with_fd` (RM_ALLOC_MEMORY): hRoot 0, hObjectParent 4,
/// hObjectNew 8, hClass 12, flags 16, pMemory 24, limit 32, status 40, fd 48.
const NVOS02_FD_SIZE: usize = 56;
/// `NVOS32_PARAMETERS` (RM_VID_HEAP_CONTROL): hRoot 0, hObjectParent 4, function 8,
/// hVASpace 12, ivcHeapNumber 16, status 20; the union `data` at 40.
const NVOS32_SIZE: usize = 184;
/// `NV_MEMORY_ALLOCATION_PARAMS.size` (120 bytes up to 535, 128 from 545; size never moved).
const MEMORY_PARAMS_SIZE_AT: usize = 64;
/// `NV_OS_DESC_MEMORY_ALLOCATION_PARAMS.limit` (40 bytes in every version).
const OS_DESC_PARAMS_LIMIT_AT: usize = 24;

/// Vid-heap functions (nvos.h `NVOS32_FUNCTION_*`).
mod vid_heap {
    pub const ALLOC_SIZE: u32 = 2;
    pub const FREE: u32 = 3;
    pub const ALLOC_OS_DESCRIPTOR: u32 = 27;
    /// INFO, RELEASE_COMPR, REACQUIRE_COMPR, GET_MEM_ALIGNMENT, HW_FREE: no memory object made.
    pub const UNTRACKED: [u32; 5] = [5, 15, 16, 18, 20];
    /// `data.AllocSize`: hMemory 44, flags 52, attr 56, size 88, attr2 144.
    pub const ALLOC_HMEMORY: usize = 44;
    pub const ALLOC_FLAGS: usize = 52;
    pub const ALLOC_ATTR: usize = 56;
    pub const ALLOC_SIZE_AT: usize = 88;
    pub const ALLOC_ATTR2: usize = 144;
    /// `data.Free`: owner 40, hMemory 44, flags 48.
    pub const FREE_HMEMORY: usize = 44;
    /// `data.AllocOsDesc`: hMemory 40, limit 72.
    pub const OS_DESC_HMEMORY: usize = 40;
    pub const OS_DESC_LIMIT: usize = 72;
    /// `NVOS32_ALLOC_FLAGS_VIRTUAL`: an address range without memory.
    pub const FLAGS_VIRTUAL: u32 = 0x0008_0000;
    /// `NVOS32_ATTR_LOCATION` is bits 26:25; `_VIDMEM` is 0.
    pub const ATTR_LOCATION_SHIFT: u32 = 25;
    /// `NVOS32_ATTR2_USE_EGM` is bit 24 (550 to 590).
    pub const ATTR2_USE_EGM: u32 = 1 << 24;
}

/// A parameter block: the bytes copied, read only within their bounds.
#[derive(Clone, Copy)]
struct Block<'a> {
    escape: Escape,
    bytes: &'a [u8],
}

impl Block<'_> {
    fn u32(&self, at: usize) -> Result<u32, NotDecoded> {
        read_u32(self.bytes, at).ok_or(self.short(at + 4))
    }

    fn u64(&self, at: usize) -> Result<u64, NotDecoded> {
        read_u64(self.bytes, at).ok_or(self.short(at + 8))
    }

    fn short(&self, need: usize) -> NotDecoded {
        NotDecoded::ShortParams {
            escape: self.escape,
            len: self.bytes.len(),
            need,
        }
    }

    /// `Refused` when the driver's status at `at` is not 0.
    fn refused(&self, at: usize) -> Result<Option<RmCall>, NotDecoded> {
        let status = self.u32(at)?;
        Ok((status != 0).then_some(RmCall::Refused {
            escape: self.escape,
            status,
        }))
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(b.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_ne_bytes(b.try_into().ok()?))
}

/// Decodes one record with `layout`.
pub fn decode(layout: &Layout, record: &GpuIoctl) -> RmCall {
    decode_checked(layout, record).unwrap_or_else(RmCall::NotDecoded)
}

fn decode_checked(layout: &Layout, record: &GpuIoctl) -> Result<RmCall, NotDecoded> {
    if record.ret != 0 {
        return Err(NotDecoded::IoctlFailed(record.ret));
    }
    let (escape, size) = command(record.cmd)?;
    let len = (record.params_len as usize).min(record.params.len());
    let bytes = &record.params[..len];
    match escape {
        Escape::Alloc => {
            let alloc_len = (record.alloc_params_len as usize).min(record.alloc_params.len());
            decode_alloc(layout, size, bytes, &record.alloc_params[..alloc_len])
        }
        Escape::Free => decode_free(block(escape, size, NVOS00_SIZE, bytes)?),
        Escape::DupObject => decode_dup(block(escape, size, NVOS55_SIZE, bytes)?),
        Escape::AllocMemory => decode_alloc_memory(block(escape, size, NVOS02_FD_SIZE, bytes)?),
        Escape::VidHeapControl => decode_vid_heap(layout, block(escape, size, NVOS32_SIZE, bytes)?),
    }
}

/// The escape and the parameter size of `_IOWR('F', nr, size)`.
fn command(cmd: u32) -> Result<(Escape, usize), NotDecoded> {
    let nr = cmd & 0xff;
    let kind = (cmd >> 8) & 0xff;
    let size = ((cmd >> 16) & 0x3fff) as usize;
    match Escape::from_nr(nr) {
        Some(escape) if kind == NV_IOCTL_MAGIC => Ok((escape, size)),
        _ => Err(NotDecoded::UnknownCommand(cmd)),
    }
}

/// The block of `escape` if the command's `size` is the driver's `expected` one and that many
/// bytes were copied.
fn block(
    escape: Escape,
    size: usize,
    expected: usize,
    bytes: &[u8],
) -> Result<Block<'_>, NotDecoded> {
    if size != expected {
        return Err(NotDecoded::UnexpectedSize { escape, size });
    }
    let block = Block { escape, bytes };
    if bytes.len() < expected {
        return Err(block.short(expected));
    }
    Ok(block)
}

/// NVOS21 or NVOS64, chosen by the command's size as escape.c does.
fn decode_alloc(
    layout: &Layout,
    size: usize,
    bytes: &[u8],
    alloc: &[u8],
) -> Result<RmCall, NotDecoded> {
    let escape = Escape::Alloc;
    let shape: RmAllocLayout = [layout.nvos21, layout.nvos64]
        .into_iter()
        .find(|s| s.size == size)
        .ok_or(NotDecoded::UnexpectedSize { escape, size })?;
    let params = block(escape, size, shape.size, bytes)?;
    if let Some(refused) = params.refused(shape.status)? {
        return Ok(refused);
    }
    let (client, parent, handle, class) = (
        params.u32(0)?,
        params.u32(4)?,
        params.u32(8)?,
        params.u32(12)?,
    );
    if class::ROOTS.contains(&class) {
        return Ok(RmCall::ClientAlloc {
            client: handle,
            class,
        });
    }
    Ok(RmCall::Alloc(ObjectAlloc {
        client,
        parent,
        handle,
        class,
        kind: alloc_kind(class, alloc)?,
        path: AllocPath::RmAlloc,
    }))
}

/// What an RM_ALLOC of `class` made, sized from its allocation parameters `alloc`.
fn alloc_kind(class: u32, alloc: &[u8]) -> Result<ObjectKind, NotDecoded> {
    let short = |need: usize| NotDecoded::ShortAllocParams {
        class,
        len: alloc.len(),
        need,
    };
    let memory = |placement, at: usize| {
        let bytes = read_u64(alloc, at).ok_or(short(at + 8))?;
        Ok(ObjectKind::Memory { placement, bytes })
    };
    match class {
        class::DEVICE => Ok(ObjectKind::Device {
            device_id: read_u32(alloc, 0),
        }),
        class::MEMORY_LOCAL_USER => memory(Placement::Vram, MEMORY_PARAMS_SIZE_AT),
        class::MEMORY_SYSTEM => memory(Placement::Host, MEMORY_PARAMS_SIZE_AT),
        class::MEMORY_OS_DESCRIPTOR => {
            let limit = read_u64(alloc, OS_DESC_PARAMS_LIMIT_AT)
                .ok_or(short(OS_DESC_PARAMS_LIMIT_AT + 8))?;
            Ok(host_limit(limit))
        }
        c if class::SIZELESS.binary_search(&c).is_ok() => Ok(ObjectKind::Sizeless),
        _ => Ok(ObjectKind::Unknown),
    }
}

/// Host memory whose last byte is at `limit` (size = limit + 1).
fn host_limit(limit: u64) -> ObjectKind {
    ObjectKind::Memory {
        placement: Placement::Host,
        bytes: limit.saturating_add(1),
    }
}

fn decode_free(params: Block<'_>) -> Result<RmCall, NotDecoded> {
    if let Some(refused) = params.refused(12)? {
        return Ok(refused);
    }
    Ok(RmCall::Free {
        client: params.u32(0)?,
        parent: params.u32(4)?,
        handle: params.u32(8)?,
    })
}

fn decode_dup(params: Block<'_>) -> Result<RmCall, NotDecoded> {
    if let Some(refused) = params.refused(24)? {
        return Ok(refused);
    }
    Ok(RmCall::Dup(Dup {
        client: params.u32(0)?,
        parent: params.u32(4)?,
        handle: params.u32(8)?,
        src_client: params.u32(12)?,
        src_handle: params.u32(16)?,
    }))
}

/// RM_ALLOC_MEMORY (rmapi_deprecated_allocmemory.c): system memory and OS descriptors are
/// `limit + 1` bytes; `NV01_MEMORY_LOCAL_USER` there only makes a view of the whole
/// framebuffer (or a dummy handle), no new memory.
fn decode_alloc_memory(params: Block<'_>) -> Result<RmCall, NotDecoded> {
    if let Some(refused) = params.refused(40)? {
        return Ok(refused);
    }
    let class = params.u32(12)?;
    let kind = match class {
        class::MEMORY_SYSTEM | class::MEMORY_OS_DESCRIPTOR => host_limit(params.u64(32)?),
        class::MEMORY_LOCAL_USER | class::MEMORY_VIRTUAL => ObjectKind::Sizeless,
        _ => ObjectKind::Unknown,
    };
    Ok(RmCall::Alloc(ObjectAlloc {
        client: params.u32(0)?,
        parent: params.u32(4)?,
        handle: params.u32(8)?,
        class,
        kind,
        path: AllocPath::AllocMemory,
    }))
}

fn decode_vid_heap(layout: &Layout, params: Block<'_>) -> Result<RmCall, NotDecoded> {
    if let Some(refused) = params.refused(20)? {
        return Ok(refused);
    }
    let (client, parent) = (params.u32(0)?, params.u32(4)?);
    let vid_heap_alloc = |handle, class, kind| {
        RmCall::Alloc(ObjectAlloc {
            client,
            parent,
            handle,
            class,
            kind,
            path: AllocPath::VidHeap,
        })
    };
    match params.u32(8)? {
        vid_heap::ALLOC_SIZE => {
            let (class, kind) = vid_heap_alloc_size(layout, params)?;
            Ok(vid_heap_alloc(
                params.u32(vid_heap::ALLOC_HMEMORY)?,
                class,
                kind,
            ))
        }
        vid_heap::ALLOC_OS_DESCRIPTOR => Ok(vid_heap_alloc(
            params.u32(vid_heap::OS_DESC_HMEMORY)?,
            class::MEMORY_OS_DESCRIPTOR,
            host_limit(params.u64(vid_heap::OS_DESC_LIMIT)?),
        )),
        vid_heap::FREE => Ok(RmCall::Free {
            client,
            parent,
            handle: params.u32(vid_heap::FREE_HMEMORY)?,
        }),
        f if vid_heap::UNTRACKED.contains(&f) => Ok(RmCall::Untracked { function: f }),
        f => Err(NotDecoded::VidHeapFunction(f)),
    }
}

/// The class RM chose for a vid-heap ALLOC_SIZE (rmapi_deprecated_vidheapctrl.c:
/// virtual, then EGM where the driver has it, then video memory, else system memory).
fn vid_heap_alloc_size(
    layout: &Layout,
    params: Block<'_>,
) -> Result<(u32, ObjectKind), NotDecoded> {
    let flags = params.u32(vid_heap::ALLOC_FLAGS)?;
    let attr = params.u32(vid_heap::ALLOC_ATTR)?;
    let attr2 = params.u32(vid_heap::ALLOC_ATTR2)?;
    let bytes = params.u64(vid_heap::ALLOC_SIZE_AT)?;
    Ok(if flags & vid_heap::FLAGS_VIRTUAL != 0 {
        (class::NV50_MEMORY_VIRTUAL, ObjectKind::Sizeless)
    } else if layout.vid_heap_egm && attr2 & vid_heap::ATTR2_USE_EGM != 0 {
        (class::MEMORY_EXTENDED_USER, ObjectKind::Unknown)
    } else if (attr >> vid_heap::ATTR_LOCATION_SHIFT) & 0b11 == 0 {
        let placement = Placement::Vram;
        (
            class::MEMORY_LOCAL_USER,
            ObjectKind::Memory { placement, bytes },
        )
    } else {
        let placement = Placement::Host;
        (
            class::MEMORY_SYSTEM,
            ObjectKind::Memory { placement, bytes },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizeless_classes_are_sorted_and_exclude_memory_and_clients() {
        assert!(class::SIZELESS.windows(2).all(|w| w[0] < w[1]));
        for c in [
            class::MEMORY_SYSTEM,
            class::MEMORY_LOCAL_USER,
            class::MEMORY_OS_DESCRIPTOR,
            class::MEMORY_EXTENDED_USER,
            class::DEVICE,
            0xf8,
        ]
        .into_iter()
        .chain(class::ROOTS)
        {
            assert!(class::SIZELESS.binary_search(&c).is_err(), "{c:#x}");
        }
    }

    #[test]
    fn commands_need_the_nvidia_magic_and_a_known_escape() {
        assert_eq!(command(0xc020_462b), Ok((Escape::Alloc, 32)));
        assert_eq!(command(0xc0b8_464a), Ok((Escape::VidHeapControl, 184)));
        assert_eq!(
            command(0xc020_472b),
            Err(NotDecoded::UnknownCommand(0xc020_472b))
        );
        assert_eq!(
            command(0xc020_462a),
            Err(NotDecoded::UnknownCommand(0xc020_462a))
        );
    }

    #[test]
    fn reads_stay_in_bounds() {
        let bytes = [1u8, 0, 0, 0, 2, 0, 0, 0];
        assert_eq!(read_u32(&bytes, 4), Some(u32::from_ne_bytes([2, 0, 0, 0])));
        assert_eq!(read_u32(&bytes, 5), None);
        assert_eq!(read_u64(&bytes, 1), None);
        assert_eq!(read_u32(&bytes, usize::MAX - 1), None);
        assert_eq!(read_u64(&bytes, usize::MAX), None);
    }
}
