//! Developer tasks for infermem. The library half is shared with the agent's build script,
//! which uses [`toolchain::ensure`] so that a plain `cargo build` works on a fresh machine.

pub mod toolchain;
