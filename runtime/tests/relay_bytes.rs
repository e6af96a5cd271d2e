//! The relay moves exactly the bytes it is given, both directions at once, in every mode on
//! every backend.

mod common;

use common::*;

#[test]
fn relay_is_byte_exact_both_directions_at_once() {
    init_tracing();
    for (backend, mode) in matrix() {
        for len in [0u64, 1, 64 * 1024, 100 << 20] {
            let (up, server) = pattern_server(len, 1, 2);
            let relay = RelayFixture::start(backend, mode, up);
            let got = pattern_client(relay.addr, len, 1, 2)
                .unwrap_or_else(|e| panic!("{backend}/{mode} {len} B: client: {e}"));
            let verified = server
                .join()
                .expect("server thread")
                .unwrap_or_else(|e| panic!("{backend}/{mode} {len} B: server: {e}"));
            assert_eq!(got, len, "{backend}/{mode}: reply length");
            assert_eq!(verified, len, "{backend}/{mode}: request length");
            relay.stop_and_check(len);
        }
    }
}

trait StopAndCheck {
    fn stop_and_check(self, len: u64);
}

impl StopAndCheck for RelayFixture {
    fn stop_and_check(self, len: u64) {
        let outcomes = self.outcomes.clone();
        self.stop();
        let o = outcomes.lock().unwrap();
        assert_eq!(o.len(), 1, "one relayed connection");
        assert_eq!(
            (o[0].up, o[0].down),
            (len, len),
            "byte counts per direction"
        );
        assert!(
            o[0].error.is_none(),
            "clean close expected, got {:?}",
            o[0].error
        );
    }
}
