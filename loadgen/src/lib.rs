#![forbid(unsafe_code)]
//! zring-loadgen: placeholder crate; see README.md for what lands here.
