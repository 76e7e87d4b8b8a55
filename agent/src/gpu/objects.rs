//! The live RM objects of each process, paired by (client, handle), and the bytes they hold
//! per device.
//!
//! Objects are kept per process (a process can only corrupt its own figures by forging
//! parameter blocks), per client, with their children, so that freeing a client or any object
//! frees its subtree. Tables are bounded: a hostile process cannot make the agent grow
//! without limit ([`OBJECTS_PER_PROCESS_MAX`], [`OBJECTS_MAX`], [`UNKNOWN_CLASSES_MAX`]).
//! Limits of the model: a dup holds no bytes, so freeing the original handle releases them
//! even while the dup keeps the memory alive in the driver; objects made before the agent
//! started are unknown (their frees count as unpaired).

use std::collections::{BTreeMap, HashMap, HashSet};

use infermem_common::nvidia_fd;

use super::{
    UNKNOWN_DEVICE,
    decode::{AllocPath, Dup, ObjectAlloc, ObjectKind, Placement, RmCall},
};

/// The most live objects (clients included) tracked for one process.
pub const OBJECTS_PER_PROCESS_MAX: usize = 1 << 16;
/// The most live objects tracked over all processes.
pub const OBJECTS_MAX: usize = 1 << 20;
/// The most distinct class ids [`GpuCounters::unknown_classes`] keeps; further ids are
/// counted under [`UNKNOWN_CLASS_OVERFLOW`].
pub const UNKNOWN_CLASSES_MAX: usize = 256;
/// The key of [`GpuCounters::unknown_classes`] counting classes beyond the first
/// [`UNKNOWN_CLASSES_MAX`].
pub const UNKNOWN_CLASS_OVERFLOW: u32 = u32::MAX;

/// Live bytes on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceUsage {
    /// RM device instance (`N` of /dev/nvidiaN), or [`UNKNOWN_DEVICE`].
    pub device: u32,
    pub vram_bytes: u64,
    pub host_pinned_bytes: u64,
}

/// What the tracker saw, for health reporting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuCounters {
    /// Calls decoded and applied (allocations, frees, dups, queries).
    pub decoded: u64,
    /// Calls RM refused (status not 0): nothing changed.
    pub refused: u64,
    /// Records that could not be decoded.
    pub undecodable: u64,
    /// Objects of classes the decoder does not know or cannot size, by class id.
    pub unknown_classes: BTreeMap<u32, u64>,
    /// Frees of objects the tracker did not know.
    pub unpaired_frees: u64,
    /// Dups seen (new handles for existing objects: no new bytes).
    pub dups: u64,
    /// Objects not tracked because a table was full.
    pub over_capacity: u64,
}

/// One live object.
#[derive(Debug, Default)]
struct Object {
    device: u32,
    memory: Option<(Placement, u64)>,
    parent: u32,
    children: HashSet<u32>,
}

/// Bytes per device, exact (u128: forged sizes cannot overflow a sum of at most 2^20 u64s).
type Usage = BTreeMap<u32, [u128; 2]>;

/// One process's clients and their objects.
#[derive(Debug, Default)]
struct Process {
    /// client handle → (object handle → object).
    clients: HashMap<u32, HashMap<u32, Object>>,
    /// Live objects, clients included.
    objects: usize,
    usage: Usage,
}

/// The live RM objects of every process.
#[derive(Debug, Default)]
pub struct GpuObjects {
    processes: HashMap<u32, Process>,
    objects: usize,
    counters: GpuCounters,
}

impl GpuObjects {
    /// An empty tracker.
    pub fn new() -> GpuObjects {
        GpuObjects::default()
    }

    /// Applies one decoded call made by process `tgid` on an fd of kind `fd_kind`.
    pub fn apply(&mut self, tgid: u32, fd_kind: u32, call: &RmCall) {
        match call {
            RmCall::Refused { .. } => self.counters.refused += 1,
            RmCall::NotDecoded(_) => self.counters.undecodable += 1,
            _ => self.counters.decoded += 1,
        }
        match call {
            RmCall::ClientAlloc { client, .. } => self.add_client(tgid, *client),
            RmCall::Alloc(alloc) => self.add_object(tgid, fd_kind, alloc),
            RmCall::Free { client, handle, .. } => self.free(tgid, *client, *handle),
            RmCall::Dup(dup) => self.add_dup(tgid, dup),
            RmCall::Untracked { .. } | RmCall::Refused { .. } | RmCall::NotDecoded(_) => {}
        }
    }

    /// The process exited: everything it allocated is released (its clients freed).
    pub fn process_exited(&mut self, tgid: u32) {
        if let Some(process) = self.processes.remove(&tgid) {
            self.objects -= process.objects;
        }
    }

    /// The devices on which the process holds live bytes, sorted by device.
    pub fn usage(&self, tgid: u32) -> Vec<DeviceUsage> {
        self.processes
            .get(&tgid)
            .map(|p| usage_list(&p.usage))
            .unwrap_or_default()
    }

    /// Live bytes per device over all processes, sorted by device.
    pub fn device_totals(&self) -> Vec<DeviceUsage> {
        let mut totals = Usage::new();
        for process in self.processes.values() {
            for (device, bytes) in &process.usage {
                let total = totals.entry(*device).or_default();
                total[0] += bytes[0];
                total[1] += bytes[1];
            }
        }
        usage_list(&totals)
    }

    /// What the tracker saw.
    pub fn counters(&self) -> &GpuCounters {
        &self.counters
    }

    /// Whether `added` more objects fit for `tgid`; counts a refusal when not.
    fn has_room(&mut self, tgid: u32, added: usize) -> bool {
        let process_objects = self.processes.get(&tgid).map_or(0, |p| p.objects);
        let room = process_objects + added <= OBJECTS_PER_PROCESS_MAX
            && self.objects + added <= OBJECTS_MAX;
        if !room {
            self.counters.over_capacity += 1;
        }
        room
    }

    /// A new client; a stale one with the same handle (a missed free) is dropped first.
    fn add_client(&mut self, tgid: u32, client: u32) {
        self.free_client(tgid, client);
        if !self.has_room(tgid, 1) {
            return;
        }
        let process = self.processes.entry(tgid).or_default();
        process.clients.insert(client, HashMap::new());
        process.objects += 1;
        self.objects += 1;
    }

    /// Drops a client and all its objects; whether it was known.
    fn free_client(&mut self, tgid: u32, client: u32) -> bool {
        let Some(process) = self.processes.get_mut(&tgid) else {
            return false;
        };
        let Some(objects) = process.clients.remove(&client) else {
            return false;
        };
        for object in objects.values() {
            release(&mut process.usage, object);
        }
        let dropped = objects.len() + 1;
        process.objects -= dropped;
        self.objects -= dropped;
        true
    }

    /// Removes a process that holds nothing any more.
    fn forget_if_empty(&mut self, tgid: u32) {
        if self.processes.get(&tgid).is_some_and(|p| p.objects == 0) {
            self.processes.remove(&tgid);
        }
    }

    fn add_object(&mut self, tgid: u32, fd_kind: u32, alloc: &ObjectAlloc) {
        if alloc.kind == ObjectKind::Unknown {
            self.count_unknown_class(alloc.class);
        }
        let minor = fd_kind.checked_sub(nvidia_fd::DEVICE);
        let fallback = match (alloc.path, minor) {
            (AllocPath::AllocMemory, Some(n)) if n <= nvidia_fd::MAX_DEVICE_MINOR => n,
            _ => UNKNOWN_DEVICE,
        };
        let memory = match alloc.kind {
            ObjectKind::Memory { placement, bytes } => Some((placement, bytes)),
            _ => None,
        };
        let own_device = match alloc.kind {
            ObjectKind::Device { device_id } => Some(device_id.unwrap_or(UNKNOWN_DEVICE)),
            _ => None,
        };
        let object = Object {
            device: fallback,
            memory,
            parent: alloc.parent,
            children: HashSet::new(),
        };
        self.insert(tgid, alloc.client, alloc.handle, object, own_device);
    }

    /// A dup: a child of its parent with the source's device when the source is known here.
    fn add_dup(&mut self, tgid: u32, dup: &Dup) {
        self.counters.dups += 1;
        let source_device = self
            .processes
            .get(&tgid)
            .and_then(|p| p.clients.get(&dup.src_client)?.get(&dup.src_handle))
            .map(|o| o.device)
            .filter(|d| *d != UNKNOWN_DEVICE);
        let object = Object {
            device: UNKNOWN_DEVICE,
            memory: None,
            parent: dup.parent,
            children: HashSet::new(),
        };
        self.insert(tgid, dup.client, dup.handle, object, source_device);
    }

    /// Tracks `object` as (client, handle): its device is `own_device`, else its parent's,
    /// else the fallback already in `object.device`. A stale object with the same handle (a
    /// missed free: RM never hands out a live handle twice) is freed first. A handle equal to
    /// its client (which RM never makes) is an ordinary entry, freed with the client.
    fn insert(
        &mut self,
        tgid: u32,
        client: u32,
        handle: u32,
        mut object: Object,
        own_device: Option<u32>,
    ) {
        self.free_object(tgid, client, handle);
        let process = self.processes.get(&tgid);
        // A client first seen through one of its objects counts as an object too.
        let new_client = !process.is_some_and(|p| p.clients.contains_key(&client));
        let added = 1 + usize::from(new_client);
        if !self.has_room(tgid, added) {
            return;
        }
        let process = self.processes.entry(tgid).or_default();
        let objects = process.clients.entry(client).or_default();
        let parent = objects.get_mut(&object.parent);
        let parent_device = parent.as_ref().map(|p| p.device);
        if let Some(parent) = parent {
            parent.children.insert(handle);
        }
        let inherited = parent_device.filter(|d| *d != UNKNOWN_DEVICE);
        object.device = own_device.or(inherited).unwrap_or(object.device);
        acquire(&mut process.usage, &object);
        objects.insert(handle, object);
        process.objects += added;
        self.objects += added;
    }

    /// RM_FREE (or vid-heap FREE): the client when `handle == client`, else the object and
    /// its subtree.
    fn free(&mut self, tgid: u32, client: u32, handle: u32) {
        let known = if handle == client {
            self.free_client(tgid, client)
        } else {
            self.free_object(tgid, client, handle)
        };
        if !known {
            self.counters.unpaired_frees += 1;
        }
        self.forget_if_empty(tgid);
    }

    /// Removes (client, handle) and everything under it; whether it was known.
    fn free_object(&mut self, tgid: u32, client: u32, handle: u32) -> bool {
        let Some(process) = self.processes.get_mut(&tgid) else {
            return false;
        };
        let Some(objects) = process.clients.get_mut(&client) else {
            return false;
        };
        let Some(top) = objects.get(&handle) else {
            return false;
        };
        let parent = top.parent;
        if let Some(parent) = objects.get_mut(&parent) {
            parent.children.remove(&handle);
        }
        let mut removed = 0;
        let mut stack = vec![handle];
        while let Some(h) = stack.pop() {
            if let Some(object) = objects.remove(&h) {
                release(&mut process.usage, &object);
                stack.extend(object.children);
                removed += 1;
            }
        }
        process.objects -= removed;
        self.objects -= removed;
        true
    }

    fn count_unknown_class(&mut self, class: u32) {
        let classes = &mut self.counters.unknown_classes;
        let key = if classes.contains_key(&class) || classes.len() < UNKNOWN_CLASSES_MAX {
            class
        } else {
            UNKNOWN_CLASS_OVERFLOW
        };
        *classes.entry(key).or_default() += 1;
    }
}

/// Adds an object's bytes to its device's figures.
fn acquire(usage: &mut Usage, object: &Object) {
    if let Some((placement, bytes)) = object.memory {
        usage.entry(object.device).or_default()[slot(placement)] += u128::from(bytes);
    }
}

/// Takes an object's bytes off its device's figures (dropping a device left with none).
fn release(usage: &mut Usage, object: &Object) {
    let Some((placement, bytes)) = object.memory else {
        return;
    };
    if let Some(figures) = usage.get_mut(&object.device) {
        let figure = &mut figures[slot(placement)];
        *figure = figure.saturating_sub(u128::from(bytes));
        if *figures == [0, 0] {
            usage.remove(&object.device);
        }
    }
}

fn slot(placement: Placement) -> usize {
    match placement {
        Placement::Vram => 0,
        Placement::Host => 1,
    }
}

fn usage_list(usage: &Usage) -> Vec<DeviceUsage> {
    let clamp = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
    usage
        .iter()
        .filter(|(_, b)| **b != [0, 0])
        .map(|(device, b)| DeviceUsage {
            device: *device,
            vram_bytes: clamp(b[0]),
            host_pinned_bytes: clamp(b[1]),
        })
        .collect()
}

#[cfg(test)]
#[path = "replay/mod.rs"]
mod replay;

#[cfg(test)]
mod tests {
    use super::*;

    fn object(client: u32, parent: u32, handle: u32, kind: ObjectKind) -> RmCall {
        RmCall::Alloc(ObjectAlloc {
            client,
            parent,
            handle,
            class: 0x40,
            kind,
            path: AllocPath::RmAlloc,
        })
    }

    fn vram(bytes: u64) -> ObjectKind {
        ObjectKind::Memory {
            placement: Placement::Vram,
            bytes,
        }
    }

    fn device(id: u32) -> ObjectKind {
        ObjectKind::Device {
            device_id: Some(id),
        }
    }

    fn client(client: u32) -> RmCall {
        RmCall::ClientAlloc {
            client,
            class: 0x41,
        }
    }

    #[test]
    fn a_process_holds_at_most_its_share_of_objects() {
        let mut objects = GpuObjects::new();
        objects.apply(1, 1, &client(1));
        for handle in 2..=OBJECTS_PER_PROCESS_MAX as u32 + 10 {
            objects.apply(1, 1, &object(1, 1, handle, vram(1)));
        }
        assert_eq!(objects.counters().over_capacity, 10);
        assert_eq!(
            objects.usage(1)[0].vram_bytes,
            OBJECTS_PER_PROCESS_MAX as u64 - 1
        );
        objects.apply(
            1,
            1,
            &RmCall::Free {
                client: 1,
                parent: 1,
                handle: 2,
            },
        );
        objects.apply(1, 1, &object(1, 1, 5_000_000, vram(1)));
        assert_eq!(objects.counters().over_capacity, 10);
        objects.process_exited(1);
        assert_eq!((objects.usage(1), objects.objects), (vec![], 0));
    }

    #[test]
    fn all_processes_hold_at_most_the_total() {
        let mut objects = GpuObjects::new();
        let processes = (OBJECTS_MAX / OBJECTS_PER_PROCESS_MAX) as u32;
        for tgid in 1..=processes {
            // The client is counted as one of the process's objects.
            for handle in 2..=OBJECTS_PER_PROCESS_MAX as u32 {
                objects.apply(tgid, 1, &object(1, 1, handle, ObjectKind::Sizeless));
            }
        }
        assert_eq!(
            (objects.objects, objects.counters().over_capacity),
            (OBJECTS_MAX, 0)
        );
        objects.apply(processes + 1, 1, &client(9));
        objects.apply(processes + 1, 1, &object(9, 9, 10, vram(1)));
        assert_eq!(objects.counters().over_capacity, 2);
        assert_eq!(objects.usage(processes + 1), vec![]);
    }

    #[test]
    fn unknown_class_ids_are_bounded() {
        let mut objects = GpuObjects::new();
        for class in 0..UNKNOWN_CLASSES_MAX as u32 + 50 {
            let mut call = object(1, 1, 100 + class, ObjectKind::Unknown);
            if let RmCall::Alloc(alloc) = &mut call {
                alloc.class = 0x10000 + class;
            }
            objects.apply(1, 1, &call);
        }
        let classes = &objects.counters().unknown_classes;
        assert_eq!(classes.len(), UNKNOWN_CLASSES_MAX + 1);
        assert_eq!(classes[&UNKNOWN_CLASS_OVERFLOW], 50);
    }

    #[test]
    fn a_reused_handle_replaces_the_stale_object_and_its_subtree() {
        let mut objects = GpuObjects::new();
        objects.apply(1, 1, &object(7, 7, 0x80, device(0)));
        objects.apply(1, 1, &object(7, 0x80, 0x100, vram(100)));
        objects.apply(1, 1, &object(7, 7, 0x80, device(1)));
        objects.apply(1, 1, &object(7, 0x80, 0x101, vram(5)));
        let expected = vec![DeviceUsage {
            device: 1,
            vram_bytes: 5,
            host_pinned_bytes: 0,
        }];
        assert_eq!(objects.usage(1), expected);
        // Client 7 was seen through its objects only; freeing it still frees them all.
        objects.apply(
            1,
            1,
            &RmCall::Free {
                client: 7,
                parent: 0,
                handle: 7,
            },
        );
        assert_eq!((objects.usage(1), objects.objects), (vec![], 0));
        assert_eq!(objects.counters().unpaired_frees, 0);
    }

    #[test]
    fn a_dup_carries_its_source_device_and_frees_its_children() {
        let mut objects = GpuObjects::new();
        objects.apply(1, 1, &client(7));
        objects.apply(1, 1, &object(7, 7, 0x80, device(2)));
        let dup = Dup {
            client: 7,
            parent: 7,
            handle: 0x90,
            src_client: 7,
            src_handle: 0x80,
        };
        objects.apply(1, 1, &RmCall::Dup(dup));
        objects.apply(1, 1, &object(7, 0x90, 0x100, vram(64)));
        assert_eq!(objects.usage(1)[0].device, 2);
        objects.apply(
            1,
            1,
            &RmCall::Free {
                client: 7,
                parent: 7,
                handle: 0x90,
            },
        );
        assert_eq!(objects.usage(1), vec![]);
        assert_eq!(objects.counters().dups, 1);
    }

    #[test]
    fn only_alloc_memory_on_a_device_fd_falls_back_to_its_minor() {
        let mut objects = GpuObjects::new();
        let mut alloc = ObjectAlloc {
            client: 7,
            parent: 0xdead,
            handle: 0x100,
            class: 0x3e,
            kind: vram(1),
            path: AllocPath::AllocMemory,
        };
        objects.apply(1, nvidia_fd::DEVICE + 5, &RmCall::Alloc(alloc));
        alloc.handle = 0x101;
        objects.apply(1, nvidia_fd::DEVICE + 255, &RmCall::Alloc(alloc));
        alloc.handle = 0x102;
        alloc.path = AllocPath::RmAlloc;
        objects.apply(1, nvidia_fd::DEVICE + 5, &RmCall::Alloc(alloc));
        let devices: Vec<_> = objects
            .usage(1)
            .iter()
            .map(|u| (u.device, u.vram_bytes))
            .collect();
        assert_eq!(devices, [(5, 1), (UNKNOWN_DEVICE, 2)]);
    }

    #[test]
    fn forged_sizes_saturate_instead_of_overflowing() {
        let mut objects = GpuObjects::new();
        objects.apply(1, 1, &object(7, 7, 0x100, vram(u64::MAX)));
        objects.apply(2, 1, &object(7, 7, 0x100, vram(u64::MAX)));
        assert_eq!(objects.device_totals()[0].vram_bytes, u64::MAX);
        objects.apply(
            1,
            1,
            &RmCall::Free {
                client: 7,
                parent: 7,
                handle: 0x100,
            },
        );
        assert_eq!(objects.device_totals()[0].vram_bytes, u64::MAX);
        objects.process_exited(2);
        assert_eq!(objects.device_totals(), vec![]);
    }
}
