//! Arbitrary bytes as a message from the node agent on the ZDS socket: decoded into a payload or
//! refused with an error text (which becomes the ack); never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = zring_core::zds::client::parse_request(data);
});
