#![forbid(unsafe_code)]
//! zring-hbone: placeholder crate; see README.md for what lands here.
