//! The allocation core of the insurance-fund ledger: plain Rust over column slices.
//!
//! The Python bindings live in `py.rs` behind the `python` feature, so this crate builds and
//! is tested without Python.

#[cfg(feature = "python")]
mod py;
