//! Resolves the kernel structure offsets the probes need from the running kernel's BTF.
//!
//! aya's Rust eBPF programs have no CO-RE field relocations, so instead of compiling in the
//! layout of one kernel we look fields up by name in `/sys/kernel/btf/vmlinux` and hand the
//! offsets to the probes as a read-only global. A field this kernel lacks is marked
//! [`KernelOffsets::MISSING`] and the probe reports that value as unknown.

use btf_rs::{Btf, Type};
use infermem_common::KernelOffsets;

/// `enum mm_counter` order in every kernel since 2.6: file, anon, swap entries, shmem.
const MM_COUNTERS: usize = 4;

/// Resolves every offset the probes use; fields that cannot be found are `MISSING`.
pub fn resolve(btf: &Btf) -> KernelOffsets {
    let field = |path: &[&str]| member_offset(btf, path).unwrap_or(KernelOffsets::MISSING);
    KernelOffsets {
        task_tgid: field(&["task_struct", "tgid"]),
        task_comm: field(&["task_struct", "comm"]),
        task_mm: field(&["task_struct", "mm"]),
        task_signal: field(&["task_struct", "signal"]),
        task_cgroups: field(&["task_struct", "cgroups"]),
        signal_oom_score_adj: field(&["signal_struct", "oom_score_adj"]),
        mm_rss: mm_rss_offsets(btf).unwrap_or([KernelOffsets::MISSING; MM_COUNTERS]),
        css_set_memory_subsys: memory_subsys_offset(btf).unwrap_or(KernelOffsets::MISSING),
        css_cgroup: field(&["cgroup_subsys_state", "cgroup"]),
        cgroup_kn: field(&["cgroup", "kn"]),
        kernfs_node_id: field(&["kernfs_node", "id"]),
        exit_has_group_dead: u32::from(tracepoint_arg_count(btf, "sched_process_exit") == Some(2)),
        task_pid: field(&["task_struct", "pid"]),
        task_group_leader: field(&["task_struct", "group_leader"]),
        task_start_boottime: field(&["task_struct", "start_boottime"]),
    }
}

/// Names the fields of `offsets` that could not be resolved (for `doctor` and logs).
pub fn missing_fields(offsets: &KernelOffsets) -> Vec<&'static str> {
    let fields = [
        ("task_struct.tgid", offsets.task_tgid),
        ("task_struct.pid", offsets.task_pid),
        ("task_struct.comm", offsets.task_comm),
        ("task_struct.group_leader", offsets.task_group_leader),
        ("task_struct.start_boottime", offsets.task_start_boottime),
        ("task_struct.mm", offsets.task_mm),
        ("task_struct.signal", offsets.task_signal),
        ("task_struct.cgroups", offsets.task_cgroups),
        ("signal_struct.oom_score_adj", offsets.signal_oom_score_adj),
        ("mm_struct.rss_stat", offsets.mm_rss[0]),
        (
            "css_set.subsys[memory_cgrp_id]",
            offsets.css_set_memory_subsys,
        ),
        ("cgroup_subsys_state.cgroup", offsets.css_cgroup),
        ("cgroup.kn", offsets.cgroup_kn),
        ("kernfs_node.id", offsets.kernfs_node_id),
    ];
    fields
        .into_iter()
        .filter(|&(_, offset)| offset == KernelOffsets::MISSING)
        .map(|(name, _)| name)
        .collect()
}

/// The prototype of the `mark_victim` tracepoint, which changed in Linux 6.8 (and 6.1.133).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkVictim {
    /// `(struct task_struct *task, uid_t uid)`: the probe reads everything from the task.
    Task,
    /// `(int pid)`: the probe knows the victim fully only when it is the current task.
    Pid,
}

impl MarkVictim {
    /// The prototype in the running kernel's BTF (`btf_trace_mark_victim`); None if the
    /// tracepoint is missing or has a prototype the probes do not know.
    pub fn detect(btf: &Btf) -> Option<MarkVictim> {
        match tracepoint_arg_count(btf, "mark_victim")? {
            2 => Some(MarkVictim::Task),
            1 => Some(MarkVictim::Pid),
            _ => None,
        }
    }

    /// The BPF program written for this prototype.
    pub fn program(self) -> &'static str {
        match self {
            MarkVictim::Task => infermem_common::Probe::OomVictim.program(),
            MarkVictim::Pid => infermem_common::MARK_VICTIM_PID_PROGRAM,
        }
    }

    /// The prototype, as C.
    pub fn prototype(self) -> &'static str {
        match self {
            MarkVictim::Task => "mark_victim(struct task_struct *, uid_t)",
            MarkVictim::Pid => "mark_victim(int pid)",
        }
    }
}

/// The named struct (not a forward declaration).
fn find_struct(btf: &Btf, name: &str) -> Option<btf_rs::Struct> {
    btf.resolve_types_by_name(name)
        .ok()?
        .into_iter()
        .find_map(|ty| match ty {
            Type::Struct(s) => Some(s),
            _ => None,
        })
}

/// Skips typedefs and qualifiers to the underlying type.
fn strip(btf: &Btf, mut ty: Type) -> Option<Type> {
    for _ in 0..16 {
        ty = match ty {
            Type::Typedef(t) => btf.resolve_chained_type(&t).ok()?,
            Type::Volatile(t) | Type::Const(t) | Type::Restrict(t) => {
                btf.resolve_chained_type(&t).ok()?
            }
            Type::TypeTag(t) => btf.resolve_chained_type(&t).ok()?,
            other => return Some(other),
        };
    }
    None
}

/// Finds `name` among the members of `s`, descending into anonymous structs and unions
/// (where `mm_struct` keeps most of its fields). Returns the byte offset and the member.
fn find_member(btf: &Btf, s: &btf_rs::Struct, name: &str) -> Option<(u32, btf_rs::Member)> {
    for member in &s.members {
        let member_name = btf.resolve_name(member).unwrap_or_default();
        if member_name == name {
            return Some((member.bit_offset() / 8, member.clone()));
        }
        if member_name.is_empty() {
            let inner = strip(btf, btf.resolve_chained_type(member).ok()?)?;
            if let Type::Struct(inner) | Type::Union(inner) = inner
                && let Some((offset, found)) = find_member(btf, &inner, name)
            {
                return Some((member.bit_offset() / 8 + offset, found));
            }
        }
    }
    None
}

/// Byte offset of `path[1]` in struct `path[0]` (single level).
fn member_offset(btf: &Btf, path: &[&str]) -> Option<u32> {
    let [struct_name, field] = path else {
        return None;
    };
    let s = find_struct(btf, struct_name)?;
    find_member(btf, &s, field).map(|(offset, _)| offset)
}

/// Offsets of the four RSS counters inside `mm_struct`, each a signed 64-bit page count:
/// Linux 6.2+ has `struct percpu_counter rss_stat[NR_MM_COUNTERS]` (we read the approximate
/// global `count`, as the OOM killer's own report does); older kernels have
/// `struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; } rss_stat`.
fn mm_rss_offsets(btf: &Btf) -> Option<[u32; MM_COUNTERS]> {
    let mm = find_struct(btf, "mm_struct")?;
    let (base, member) = find_member(btf, &mm, "rss_stat")?;
    let (first, stride) = match strip(btf, btf.resolve_chained_type(&member).ok()?)? {
        Type::Array(array) => {
            let element = strip(btf, btf.resolve_chained_type(&array).ok()?)?;
            let Type::Struct(counter) = element else {
                return None;
            };
            let (count, _) = find_member(btf, &counter, "count")?;
            (base + count, u32::try_from(counter.size()).ok()?)
        }
        Type::Struct(stat) => {
            let (count, _) = find_member(btf, &stat, "count")?;
            (base + count, 8)
        }
        _ => return None,
    };
    let mut offsets = [0; MM_COUNTERS];
    for (i, offset) in offsets.iter_mut().enumerate() {
        *offset = first + stride * i as u32;
    }
    Some(offsets)
}

/// Offset of `css_set.subsys[memory_cgrp_id]`.
fn memory_subsys_offset(btf: &Btf) -> Option<u32> {
    let base = member_offset(btf, &["css_set", "subsys"])?;
    let memory_id = btf
        .resolve_types_by_name("cgroup_subsys_id")
        .ok()?
        .into_iter()
        .find_map(|ty| match ty {
            Type::Enum(e) => e
                .members
                .iter()
                .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == "memory_cgrp_id"))
                .map(|m| m.val()),
            _ => None,
        })?;
    Some(base + 8 * memory_id)
}

/// Number of arguments of a raw tracepoint (without the leading `void *` context).
fn tracepoint_arg_count(btf: &Btf, tracepoint: &str) -> Option<usize> {
    let typedef = btf
        .resolve_types_by_name(&format!("btf_trace_{tracepoint}"))
        .ok()?
        .into_iter()
        .find(|ty| matches!(ty, Type::Typedef(_)))?;
    let Type::Ptr(ptr) = strip(btf, typedef)? else {
        return None;
    };
    let Type::FuncProto(proto) = btf.resolve_chained_type(&ptr).ok()? else {
        return None;
    };
    proto.parameters.len().checked_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resolves against the running kernel: this machine's BTF is the real input.
    #[test]
    fn resolves_every_field_on_the_running_kernel() {
        let btf = Btf::from_file("/sys/kernel/btf/vmlinux")
            .expect("this kernel exposes BTF at /sys/kernel/btf/vmlinux");
        let offsets = resolve(&btf);
        assert_eq!(missing_fields(&offsets), Vec::<&str>::new());
        // Sanity: distinct counters, 8 bytes apart or a percpu_counter apart.
        let rss = offsets.mm_rss;
        assert!(rss[1] > rss[0] && rss[1] - rss[0] == rss[2] - rss[1]);
        // comm is a 16-byte array after tgid in every layout we know.
        assert_ne!(offsets.task_comm, offsets.task_tgid);
        assert!(
            MarkVictim::detect(&btf).is_some(),
            "unknown mark_victim prototype"
        );
    }

    /// A minimal BTF blob declaring `btf_trace_mark_victim` as a pointer to a function taking
    /// `void *` and then `params` (type ids: 1 = int, 4 = struct task_struct *, 5 = uid_t),
    /// as the kernel's BTF does for every raw tracepoint.
    fn mark_victim_btf(params: &[u32]) -> Vec<u8> {
        const INT: u32 = 1;
        const PTR: u32 = 2;
        const STRUCT: u32 = 4;
        const TYPEDEF: u32 = 8;
        const FUNC_PROTO: u32 = 13;
        let strings = b"\0int\0task_struct\0uid_t\0btf_trace_mark_victim\0";
        let name = |s: &str| {
            let at = strings
                .windows(s.len() + 1)
                .position(|w| &w[1..] == s.as_bytes());
            at.expect("name in the string section") as u32 + 1
        };
        let ty = |name_off: u32, kind: u32, vlen: u32, size_or_type: u32| {
            [name_off, kind << 24 | vlen, size_or_type]
        };
        let mut types: Vec<u32> = Vec::new();
        types.extend(ty(name("int"), INT, 0, 4)); // 1
        types.push(1 << 24 | 32); // signed, 32 bits
        types.extend(ty(0, PTR, 0, 0)); // 2: void *
        types.extend(ty(name("task_struct"), STRUCT, 0, 0)); // 3
        types.extend(ty(0, PTR, 0, 3)); // 4: struct task_struct *
        types.extend(ty(name("uid_t"), TYPEDEF, 0, 1)); // 5
        let arity = params.len() as u32 + 1;
        types.extend(ty(0, FUNC_PROTO, arity, 0)); // 6: void (*)(void *, ...)
        for param in std::iter::once(2).chain(params.iter().copied()) {
            types.extend([0, param]);
        }
        types.extend(ty(0, PTR, 0, 6)); // 7
        types.extend(ty(name("btf_trace_mark_victim"), TYPEDEF, 0, 7)); // 8
        let type_len = types.len() as u32 * 4;
        let mut blob = vec![0x9f, 0xeb, 1, 0];
        for word in [24, 0, type_len, type_len, strings.len() as u32] {
            blob.extend(u32::to_le_bytes(word));
        }
        blob.extend(types.iter().flat_map(|w| w.to_le_bytes()));
        blob.extend(strings);
        blob
    }

    #[test]
    fn mark_victim_with_a_task_and_a_uid_is_the_task_form() {
        let btf = Btf::from_bytes(&mark_victim_btf(&[4, 5])).expect("valid BTF");
        assert_eq!(MarkVictim::detect(&btf), Some(MarkVictim::Task));
        assert_eq!(MarkVictim::Task.program(), "mark_victim");
    }

    #[test]
    fn mark_victim_with_an_int_is_the_pid_form() {
        let btf = Btf::from_bytes(&mark_victim_btf(&[1])).expect("valid BTF");
        assert_eq!(MarkVictim::detect(&btf), Some(MarkVictim::Pid));
        assert_eq!(MarkVictim::Pid.program(), "mark_victim_pid");
    }

    #[test]
    fn an_unknown_mark_victim_prototype_is_none() {
        let btf = Btf::from_bytes(&mark_victim_btf(&[1, 1, 1])).expect("valid BTF");
        assert_eq!(MarkVictim::detect(&btf), None);
    }
}
