//! `infermem top`'s screen, apart from the terminal and the agent (see `commands::top`):
//!
//! - [`model`]: what is shown: the agent's latest replies, the sort, the selection, the
//!   inspect pane;
//! - [`render`]: the drawing, a pure function of the model;
//! - [`input`]: what each key does to the model.

pub mod input;
pub mod model;
pub mod render;

#[cfg(test)]
mod tests;
