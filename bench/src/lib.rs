#![forbid(unsafe_code)]
//! zring-bench: placeholder crate; see README.md for what lands here.
