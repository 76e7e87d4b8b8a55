//! Byte offsets of the NVIDIA RM ioctl parameter blocks, per driver version.
//!
//! Every figure here was read from NVIDIA's open-gpu-kernel-modules headers (MIT) by compiling
//! each release tag's headers on x86_64 and printing `sizeof`/`offsetof`
//! (src/common/sdk/nvidia/inc/nvos.h, class/cl0080.h, kernel-open/common/inc/nv-ioctl.h,
//! src/nvidia/arch/nvalloc/unix/include/nv-unix-nvos-params-wrappers.h), and the vid-heap class
//! choice from src/nvidia/interface/deprecated/rmapi_deprecated_vidheapctrl.c. Each table names
//! every tag it was checked against. What moved:
//! - 525: `NVOS64_PARAMETERS` gained `flags` (status 32 → 36, still 40 bytes);
//! - 535: `NVOS21_PARAMETERS` and `NVOS64_PARAMETERS` gained `paramsSize` (NVOS21 status
//!   24 → 28, still 32 bytes; NVOS64 status 36 → 40, 48 bytes);
//! - 545: `NV_MEMORY_ALLOCATION_PARAMS` grew from 120 to 128 bytes (`size` stays at 64);
//! - 550 to 590: a vid-heap allocation with `NVOS32_ATTR2_USE_EGM` (attr2 bit 24) makes an
//!   `NV_MEMORY_EXTENDED_USER` (0x42) object; 595 dropped that branch again.
//!
//! Versions older than 515 (the first open release) or newer than the last checked major have
//! no table: [`layout_for`] says so rather than guess.

use std::{fmt, io::Read as _, path::Path};

/// Where the loaded NVIDIA kernel module states its version.
pub const DRIVER_VERSION_PATH: &str = "/sys/module/nvidia/version";

/// The longest version text accepted (real ones look like "535.183.01").
const VERSION_TEXT_MAX: usize = 32;

/// An NVIDIA driver version such as "535.54.03" (the patch part is absent in some releases,
/// e.g. "535.98").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: Option<u32>,
    /// The text as the driver wrote it ("535.54.03" keeps its leading zero).
    text: String,
}

impl DriverVersion {
    /// Parses "MAJOR.MINOR[.PATCH]" (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<DriverVersion, LayoutError> {
        let text = text.trim();
        let bad = || LayoutError::BadVersion(text.chars().take(VERSION_TEXT_MAX).collect());
        if text.is_empty() || text.len() > VERSION_TEXT_MAX {
            return Err(bad());
        }
        let mut numbers = [None; 3];
        let mut parts = text.split('.');
        for slot in &mut numbers {
            *slot = parts
                .next()
                .map(|p| parse_number(p).ok_or_else(bad))
                .transpose()?;
        }
        match (numbers, parts.next()) {
            ([Some(major), Some(minor), patch], None) => Ok(DriverVersion {
                major,
                minor,
                patch,
                text: text.to_owned(),
            }),
            _ => Err(bad()),
        }
    }
}

/// One decimal component of a version: digits only (no sign, no spaces).
fn parse_number(part: &str) -> Option<u32> {
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    part.parse().ok()
}

impl fmt::Display for DriverVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Reads the driver version from `path` (normally [`DRIVER_VERSION_PATH`]); `Ok(None)` when
/// the file does not exist (no NVIDIA driver loaded: a normal state).
pub fn read_driver_version(path: &Path) -> Result<Option<DriverVersion>, LayoutError> {
    let io_error = |source| LayoutError::Read {
        path: path.display().to_string(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(e)),
    };
    let mut text = String::new();
    file.take(VERSION_TEXT_MAX as u64 + 2)
        .read_to_string(&mut text)
        .map_err(io_error)?;
    DriverVersion::parse(&text).map(Some)
}

/// Why no layout could be had.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("not an NVIDIA driver version: {0:?} (expected MAJOR.MINOR[.PATCH])")]
    BadVersion(String),
    #[error("reading the NVIDIA driver version from {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "NVIDIA driver {version} is older than the oldest supported ({oldest}): its RM ioctl \
         layout was never checked, so GPU memory is not decoded"
    )]
    TooOld { version: String, oldest: u32 },
    #[error(
        "NVIDIA driver {version} is newer than the newest checked ({newest}.x): its RM ioctl \
         layout is unknown, so GPU memory is not decoded"
    )]
    TooNew { version: String, newest: u32 },
}

/// `NV_ESC_RM_ALLOC`'s two parameter blocks: NVOS21 or NVOS64, told apart by their size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RmAllocLayout {
    /// `sizeof` (the size field of the ioctl command).
    pub size: usize,
    /// `status`; hRoot 0, hObjectParent 4, hObjectNew 8, hClass 12 and pAllocParms 16 never
    /// moved.
    pub status: usize,
}

/// Offsets of one driver version's parameter blocks (x86_64). The blocks that never moved
/// between 515 and 595 are constants in [`crate::gpu::decode`]; this holds what moved.
#[derive(Debug, PartialEq, Eq)]
pub struct Layout {
    /// The table's name ("r535" covers 535 and 545).
    pub name: &'static str,
    /// Every release tag of open-gpu-kernel-modules whose headers were compiled and found to
    /// match this table.
    pub checked_against: &'static [&'static str],
    /// The driver majors the table applies to (inclusive).
    majors: (u32, u32),
    /// `NVOS21_PARAMETERS`.
    pub(crate) nvos21: RmAllocLayout,
    /// `NVOS64_PARAMETERS`.
    pub(crate) nvos64: RmAllocLayout,
    /// Whether a vid-heap allocation with attr2 `USE_EGM` (bit 24) makes an
    /// `NV_MEMORY_EXTENDED_USER` object instead of video or system memory.
    pub(crate) vid_heap_egm: bool,
}

const NVOS21_UP_TO_530: RmAllocLayout = RmAllocLayout {
    size: 32,
    status: 24,
};
const NVOS21_FROM_535: RmAllocLayout = RmAllocLayout {
    size: 32,
    status: 28,
};

/// 515.43.04 to 520.61.07: NVOS64 without `flags` nor `paramsSize`.
static R515: Layout = Layout {
    name: "r515",
    checked_against: R515_TAGS,
    majors: (515, 524),
    nvos21: NVOS21_UP_TO_530,
    nvos64: RmAllocLayout {
        size: 40,
        status: 32,
    },
    vid_heap_egm: false,
};

/// 525.47.04 to 530.41.03: NVOS64 gained `flags` (32).
static R525: Layout = Layout {
    name: "r525",
    checked_against: R525_TAGS,
    majors: (525, 534),
    nvos21: NVOS21_UP_TO_530,
    nvos64: RmAllocLayout {
        size: 40,
        status: 36,
    },
    vid_heap_egm: false,
};

/// 535.43.02 to 545.29.06: `paramsSize` in NVOS21 (24) and NVOS64 (32).
static R535: Layout = Layout {
    name: "r535",
    checked_against: R535_TAGS,
    majors: (535, 549),
    nvos21: NVOS21_FROM_535,
    nvos64: RmAllocLayout {
        size: 48,
        status: 40,
    },
    vid_heap_egm: false,
};

/// 550.40.07 to 590.48.01: as r535, and vid-heap EGM allocations.
static R550: Layout = Layout {
    name: "r550",
    checked_against: R550_TAGS,
    majors: (550, 594),
    nvos21: NVOS21_FROM_535,
    nvos64: RmAllocLayout {
        size: 48,
        status: 40,
    },
    vid_heap_egm: true,
};

/// 595.44.02 to 595.45.04: as r535 (the EGM branch of the vid heap is gone).
static R595: Layout = Layout {
    name: "r595",
    checked_against: R595_TAGS,
    majors: (595, 595),
    nvos21: NVOS21_FROM_535,
    nvos64: RmAllocLayout {
        size: 48,
        status: 40,
    },
    vid_heap_egm: false,
};

/// The release tags each table was checked against (every tag of the open modules).
#[rustfmt::skip]
const R515_TAGS: &[&str] = &[
    "515.43.04", "515.48.07", "515.49.05", "515.49.06", "515.49.10", "515.49.14", "515.49.15",
    "515.49.18", "515.49.19", "515.49.24", "515.49.25", "515.57", "515.65.01", "515.65.07",
    "515.76", "515.86.01", "515.105.01", "520.56.06", "520.61.05", "520.61.07",
];

#[rustfmt::skip]
const R525_TAGS: &[&str] = &[
    "525.47.04", "525.47.06", "525.47.07", "525.47.11", "525.47.13", "525.47.14", "525.47.15",
    "525.47.18", "525.47.22", "525.47.24", "525.47.26", "525.47.27", "525.47.31", "525.47.34",
    "525.47.35", "525.53", "525.60.11", "525.60.13", "525.78.01", "525.85.05", "525.85.12",
    "525.89.02", "525.105.17", "525.116.03", "525.116.04", "525.125.06", "525.147.05",
    "530.30.02", "530.41.03",
];

#[rustfmt::skip]
const R535_TAGS: &[&str] = &[
    "535.43.02", "535.43.08", "535.43.09", "535.43.10", "535.43.11", "535.43.13", "535.43.15",
    "535.43.16", "535.43.19", "535.43.20", "535.43.22", "535.43.23", "535.43.24", "535.43.25",
    "535.43.28", "535.54.03", "535.86.05", "535.86.10", "535.98", "535.104.05", "535.104.12",
    "535.113.01", "535.129.03", "535.146.02", "535.154.05", "535.161.07", "535.161.08",
    "535.171.04", "535.179", "535.183.01", "535.183.06", "535.216.01", "535.216.03",
    "535.230.02", "535.247.01", "535.261.03", "535.274.02", "535.288.01", "545.23.06",
    "545.23.08", "545.29.02", "545.29.03", "545.29.06",
];

#[rustfmt::skip]
const R550_TAGS: &[&str] = &[
    "550.40.07", "550.40.53", "550.40.55", "550.40.59", "550.40.61", "550.40.63", "550.40.65",
    "550.40.67", "550.40.70", "550.40.71", "550.40.75", "550.40.76", "550.40.79", "550.40.80",
    "550.40.81", "550.40.82", "550.40.83", "550.40.85", "550.54.14", "550.54.15", "550.67",
    "550.76", "550.78", "550.90.07", "550.90.12", "550.100", "550.107.02", "550.120",
    "550.127.05", "550.127.08", "550.135", "550.142", "550.144.03", "550.163.01", "555.42.02",
    "555.42.06", "555.52.04", "555.58", "555.58.02", "560.28.03", "560.31.02", "560.35.03",
    "565.57.01", "565.77", "570.86.15", "570.86.16", "570.123.01", "570.123.06", "570.123.07",
    "570.123.10", "570.123.11", "570.123.14", "570.123.18", "570.123.19", "570.124.04",
    "570.124.06", "570.133.07", "570.133.20", "570.144", "570.148.08", "570.153.02",
    "570.158.01", "570.169", "570.172.08", "570.181", "570.190", "570.195.03", "570.207",
    "570.211.01", "575.51.02", "575.51.03", "575.57.08", "575.64", "575.64.03", "575.64.05",
    "580.65.06", "580.76.05", "580.82.07", "580.82.09", "580.94.02", "580.94.03", "580.94.06",
    "580.94.10", "580.94.11", "580.94.13", "580.94.16", "580.94.17", "580.94.18", "580.95.05",
    "580.105.08", "580.119.02", "580.126.09", "580.126.16", "580.126.18", "580.126.20",
    "580.142", "590.44.01", "590.48.01",
];

#[rustfmt::skip]
const R595_TAGS: &[&str] = &[
    "595.44.02", "595.44.03", "595.45.04",
];

/// Every table, oldest first.
pub(crate) static LAYOUTS: [&Layout; 5] = [&R515, &R525, &R535, &R550, &R595];

/// The table for `version`; an unknown version (older than supported, or newer than the last
/// checked major) is an error that says so, never a guess.
pub fn layout_for(version: &DriverVersion) -> Result<&'static Layout, LayoutError> {
    let oldest = LAYOUTS[0].majors.0;
    let newest = LAYOUTS[LAYOUTS.len() - 1].majors.1;
    if version.major < oldest {
        return Err(LayoutError::TooOld {
            version: version.to_string(),
            oldest,
        });
    }
    LAYOUTS
        .iter()
        .copied()
        .find(|l| (l.majors.0..=l.majors.1).contains(&version.major))
        .ok_or_else(|| LayoutError::TooNew {
            version: version.to_string(),
            newest,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_name(text: &str) -> &'static str {
        layout_for(&DriverVersion::parse(text).unwrap())
            .unwrap()
            .name
    }

    #[test]
    fn parses_real_version_strings() {
        for (text, major, minor, patch) in [
            ("535.183.01", 535, 183, Some(1)),
            ("550.54.14", 550, 54, Some(14)),
            ("570.86.15", 570, 86, Some(15)),
            ("515.43.04", 515, 43, Some(4)),
            ("535.98", 535, 98, None),
            ("580.142\n", 580, 142, None),
        ] {
            let v = DriverVersion::parse(text).unwrap();
            assert_eq!((v.major, v.minor, v.patch), (major, minor, patch), "{text}");
            assert_eq!(v.to_string(), text.trim());
        }
    }

    #[test]
    fn rejects_garbled_versions() {
        for text in [
            "",
            "535",
            "535.",
            ".54",
            "535.54.03.1",
            "535.-1.0",
            "535.+1",
            "a.b.c",
            "535 .54",
            "99999999999.1",
            "535.54.03.000000000000000000000000001",
        ] {
            assert!(
                matches!(DriverVersion::parse(text), Err(LayoutError::BadVersion(_))),
                "{text:?}"
            );
        }
    }

    #[test]
    fn every_checked_tag_maps_to_its_own_table() {
        for layout in LAYOUTS {
            for tag in layout.checked_against {
                assert_eq!(layout_name(tag), layout.name, "{tag}");
            }
        }
    }

    #[test]
    fn versions_pick_the_table_where_offsets_moved() {
        assert_eq!(layout_name("520.61.05"), "r515");
        assert_eq!(layout_name("525.60.13"), "r525");
        assert_eq!(layout_name("530.41.03"), "r525");
        assert_eq!(layout_name("535.54.03"), "r535");
        assert_eq!(layout_name("545.29.06"), "r535");
        assert_eq!(layout_name("550.54.14"), "r550");
        assert_eq!(layout_name("595.45.04"), "r595");
    }

    #[test]
    fn unknown_versions_are_errors_that_say_so() {
        let old = layout_for(&DriverVersion::parse("470.256.02").unwrap()).unwrap_err();
        assert!(
            matches!(old, LayoutError::TooOld { oldest: 515, .. }),
            "{old}"
        );
        assert!(old.to_string().contains("470.256.02"), "{old}");
        let new = layout_for(&DriverVersion::parse("600.10").unwrap()).unwrap_err();
        assert!(
            matches!(new, LayoutError::TooNew { newest: 595, .. }),
            "{new}"
        );
        assert!(new.to_string().contains("600.10"), "{new}");
    }

    #[test]
    fn reads_the_version_file() {
        let dir = std::env::temp_dir().join(format!("infermem-gpu-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("version");
        assert!(read_driver_version(&path).unwrap().is_none());
        std::fs::write(&path, "550.54.14\n").unwrap();
        let v = read_driver_version(&path).unwrap().unwrap();
        assert_eq!(v.to_string(), "550.54.14");
        std::fs::write(&path, "x".repeat(4096)).unwrap();
        assert!(matches!(
            read_driver_version(&path),
            Err(LayoutError::BadVersion(_))
        ));
        assert!(matches!(
            read_driver_version(&dir),
            Err(LayoutError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
