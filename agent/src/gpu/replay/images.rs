//! Parameter images laid out byte by byte as each driver version's headers lay them out
//! (open-gpu-kernel-modules, src/common/sdk/nvidia/inc/nvos.h, x86_64), written here
//! independently of the decoder's tables. Simulated: the bytes a process's parameter block
//! holds after the driver answered, as the probes would copy them.

use infermem_common::{GPU_ALLOC_PARAMS_MAX, GPU_PARAMS_MAX, GpuIoctl};

/// What one driver version's headers say about the blocks that moved.
#[derive(Debug, Clone, Copy)]
pub struct Driver {
    pub version: &'static str,
    /// `NVOS21_PARAMETERS.status`: 24 up to 530, 28 from 535 (`paramsSize` at 24).
    nvos21_status: usize,
    /// `sizeof(NVOS64_PARAMETERS)`: 40 up to 530, 48 from 535.
    nvos64_size: usize,
    /// `NVOS64_PARAMETERS.status`: 32 (515), 36 (525: `flags` at 32), 40 (535: `paramsSize`
    /// at 32, `flags` at 36).
    nvos64_status: usize,
    /// `sizeof(NV_MEMORY_ALLOCATION_PARAMS)`: 120 up to 535, 128 from 545.
    memory_params_len: usize,
    /// Whether vid-heap ALLOC_SIZE honours `NVOS32_ATTR2_USE_EGM` (550 to 590).
    pub egm: bool,
}

/// The versions replayed: each table's oldest and newest checked release, and real versions
/// in between.
pub const DRIVERS: [Driver; 9] = [
    driver("515.43.04", 24, 40, 32, 120, false),
    driver("520.61.05", 24, 40, 32, 120, false),
    driver("525.60.13", 24, 40, 36, 120, false),
    driver("530.41.03", 24, 40, 36, 120, false),
    driver("535.54.03", 28, 48, 40, 120, false),
    driver("545.29.06", 28, 48, 40, 128, false),
    driver("550.54.14", 28, 48, 40, 128, true),
    driver("570.86.15", 28, 48, 40, 128, true),
    driver("595.45.04", 28, 48, 40, 128, false),
];

const fn driver(
    version: &'static str,
    nvos21_status: usize,
    nvos64_size: usize,
    nvos64_status: usize,
    memory_params_len: usize,
    egm: bool,
) -> Driver {
    Driver {
        version,
        nvos21_status,
        nvos64_size,
        nvos64_status,
        memory_params_len,
        egm,
    }
}

/// One ioctl's command and bytes.
#[derive(Debug, Clone)]
pub struct Image {
    nr: u32,
    params: Vec<u8>,
    alloc: Vec<u8>,
}

impl Image {
    fn new(nr: u32, size: usize) -> Image {
        Image {
            nr,
            params: vec![0; size],
            alloc: Vec::new(),
        }
    }

    /// Writes a u32 at `at` of the parameter block.
    pub fn u32(mut self, at: usize, value: u32) -> Image {
        self.params[at..at + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }

    /// Writes a u64 at `at` of the parameter block.
    pub fn u64(mut self, at: usize, value: u64) -> Image {
        self.params[at..at + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }

    /// Sets the allocation parameters `pAllocParms` points to.
    pub fn alloc_params(mut self, bytes: Vec<u8>) -> Image {
        self.alloc = bytes;
        self
    }

    /// `_IOWR('F', nr, size)`.
    pub fn cmd(&self) -> u32 {
        (3 << 30) | ((self.params.len() as u32) << 16) | (u32::from(b'F') << 8) | self.nr
    }

    /// The record the probes would send for this ioctl by `tgid` on an fd of `fd_kind`.
    pub fn record(&self, tgid: u32, fd_kind: u32) -> GpuIoctl {
        let mut record = GpuIoctl {
            tgid,
            fd_kind,
            cmd: self.cmd(),
            ret: 0,
            time_ns: 1,
            params_len: self.params.len().min(GPU_PARAMS_MAX) as u32,
            alloc_params_len: self.alloc.len().min(GPU_ALLOC_PARAMS_MAX) as u32,
            params: [0; GPU_PARAMS_MAX],
            alloc_params: [0; GPU_ALLOC_PARAMS_MAX],
        };
        let n = record.params_len as usize;
        record.params[..n].copy_from_slice(&self.params[..n]);
        let n = record.alloc_params_len as usize;
        record.alloc_params[..n].copy_from_slice(&self.alloc[..n]);
        record
    }
}

/// The handles of one RM_ALLOC/RM_FREE-like call.
#[derive(Debug, Clone, Copy)]
pub struct Handles {
    pub client: u32,
    pub parent: u32,
    pub handle: u32,
}

impl Driver {
    /// RM_ALLOC with NVOS21: hRoot 0, hObjectParent 4, hObjectNew 8, hClass 12,
    /// pAllocParms 16, [paramsSize 24], status.
    pub fn nvos21(&self, h: Handles, class: u32, status: u32) -> Image {
        Image::new(0x2b, 32)
            .u32(0, h.client)
            .u32(4, h.parent)
            .u32(8, h.handle)
            .u32(12, class)
            .u64(16, 0x7fff_0000_1000)
            .u32(self.nvos21_status, status)
    }

    /// RM_ALLOC with NVOS64: as NVOS21, pRightsRequested 24, then [paramsSize], [flags],
    /// status.
    pub fn nvos64(&self, h: Handles, class: u32, status: u32) -> Image {
        Image::new(0x2b, self.nvos64_size)
            .u32(0, h.client)
            .u32(4, h.parent)
            .u32(8, h.handle)
            .u32(12, class)
            .u64(16, 0x7fff_0000_1000)
            .u32(self.nvos64_status, status)
    }

    /// `NV_MEMORY_ALLOCATION_PARAMS` with `size` (64) as the driver wrote it back.
    pub fn memory_params(&self, size: u64) -> Vec<u8> {
        let mut bytes = vec![0; self.memory_params_len];
        bytes[8..12].copy_from_slice(&0x4u32.to_ne_bytes()); // flags
        bytes[64..72].copy_from_slice(&size.to_ne_bytes());
        bytes[88..96].copy_from_slice(&size.saturating_sub(1).to_ne_bytes()); // limit
        bytes
    }
}

/// `NV_OS_DESC_MEMORY_ALLOCATION_PARAMS` (40 bytes in every version): descriptor 16, limit 24.
pub fn os_desc_params(bytes: u64) -> Vec<u8> {
    let mut params = vec![0; 40];
    params[16..24].copy_from_slice(&0x7f00_0000_0000u64.to_ne_bytes());
    params[24..32].copy_from_slice(&(bytes - 1).to_ne_bytes());
    params
}

/// `NV0080_ALLOC_PARAMETERS` (56 bytes): deviceId 0.
pub fn device_params(device_id: u32) -> Vec<u8> {
    let mut params = vec![0; 56];
    params[..4].copy_from_slice(&device_id.to_ne_bytes());
    params
}

/// RM_FREE, NVOS00 (16 bytes): hRoot 0, hObjectParent 4, hObjectOld 8, status 12.
pub fn rm_free(h: Handles, status: u32) -> Image {
    Image::new(0x29, 16)
        .u32(0, h.client)
        .u32(4, h.parent)
        .u32(8, h.handle)
        .u32(12, status)
}

/// RM_DUP_OBJECT, NVOS55 (28 bytes): hClient 0, hParent 4, hObject 8, hClientSrc 12,
/// hObjectSrc 16, flags 20, status 24.
pub fn rm_dup(h: Handles, src_client: u32, src_handle: u32) -> Image {
    Image::new(0x34, 28)
        .u32(0, h.client)
        .u32(4, h.parent)
        .u32(8, h.handle)
        .u32(12, src_client)
        .u32(16, src_handle)
}

/// RM_ALLOC_MEMORY, nv_ioctl_nvos02_parameters_with_fd (56 bytes): hRoot 0,
/// hObjectParent 4, hObjectNew 8, hClass 12, flags 16, pMemory 24, limit 32, status 40, fd 48.
pub fn rm_alloc_memory(h: Handles, class: u32, bytes: u64) -> Image {
    Image::new(0x27, 56)
        .u32(0, h.client)
        .u32(4, h.parent)
        .u32(8, h.handle)
        .u32(12, class)
        .u64(24, 0x7f00_0000_0000)
        .u64(32, bytes - 1)
        .u32(48, 7)
}

/// RM_VID_HEAP_CONTROL, NVOS32 (184 bytes): hRoot 0, hObjectParent 4, function 8, status 20;
/// ALLOC_SIZE (2): owner 40, hMemory 44, type 48, flags 52, attr 56, size 88, limit 112,
/// attr2 144.
pub fn vid_heap_alloc(h: Handles, flags: u32, attr: u32, attr2: u32, size: u64) -> Image {
    Image::new(0x4a, 184)
        .u32(0, h.client)
        .u32(4, h.parent)
        .u32(8, 2)
        .u32(44, h.handle)
        .u32(52, flags)
        .u32(56, attr)
        .u64(88, size)
        .u64(112, size - 1)
        .u32(144, attr2)
}

/// RM_VID_HEAP_CONTROL FREE (3): owner 40, hMemory 44, flags 48.
pub fn vid_heap_free(h: Handles) -> Image {
    Image::new(0x4a, 184)
        .u32(0, h.client)
        .u32(4, h.parent)
        .u32(8, 3)
        .u32(44, h.handle)
        .u32(48, 0x1) // NVOS32_FREE_FLAGS_MEMORY_HANDLE_PROVIDED
}

/// RM_VID_HEAP_CONTROL ALLOC_OS_DESCRIPTOR (27): hMemory 40, descriptor 64, limit 72.
pub fn vid_heap_os_desc(h: Handles, bytes: u64) -> Image {
    Image::new(0x4a, 184)
        .u32(0, h.client)
        .u32(4, h.parent)
        .u32(8, 27)
        .u32(40, h.handle)
        .u64(64, 0x7f00_0000_0000)
        .u64(72, bytes - 1)
}
