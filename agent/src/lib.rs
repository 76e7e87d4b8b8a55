//! infermem: sees each process's model memory from the kernel and predicts when it will not fit.
//!
//! Modules, one concern each:
//! - [`policy`]: which processes to protect and how, by profile and mode;
//! - [`act`]: applying, journalling and reverting the policy's actions; alert hooks;
//! - [`export`]: OpenTelemetry (OTLP) and Prometheus export of the same view;
//! - [`api`]: the local API's messages and the service behind it;
//! - [`probes`]: the eBPF probes (load, attach, read maps and events);
//! - [`collect`]: what procfs and cgroupfs say about a process;
//! - [`daemon`]: `infermem run`, the agent: registry, pipeline, predictor stage, API service;
//! - [`state`]: the per-process state built from both, which a daemon can keep live;
//! - [`model`]: runtimes, model files and the memory they need;
//! - [`predict`]: time to OOM, level, victim and thrashing per process, cgroup and host;
//! - [`report`]: the `inspect` report (a serde type) and its text rendering;
//! - [`inspect`]: sampling one process for `infermem inspect`;
//! - [`top`]: the screen of `infermem top` (model, rendering, keys);
//! - [`doctor`]: checks of the kernel features infermem needs or can use;
//! - [`units`]: byte sizes for people.

pub mod act;
pub mod api;
pub mod collect;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod export;
pub mod gpu;
pub mod inspect;
pub mod model;
pub mod policy;
pub mod predict;
pub mod probes;
pub mod report;
pub mod state;
pub mod top;
pub mod units;
