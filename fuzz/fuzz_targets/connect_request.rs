//! Arbitrary bytes as the client side of an HTTP/2 connection (after the preface) into the
//! HBONE CONNECT server, whose handler reads the headers zring uses (`Forwarded`). It must
//! never panic and must always finish.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use zring_hbone::{server, H2Settings, TokioLocal};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let (mut client, srv) = tokio::io::duplex(1 << 20);
        let feed = async move {
            let _ = client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Keep our end open briefly so the server can answer into it.
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(client);
        };
        let settings = H2Settings::default();
        let serve = server::serve(
            srv,
            None,
            &settings,
            TokioLocal,
            |i: server::Incoming| async move {
                // The headers zring reads from a CONNECT: Forwarded's host= part.
                for v in i.request.headers.get_all("forwarded") {
                    if let Ok(v) = v.to_str() {
                        let _ = zring_hbone::client::forwarded_host(v);
                    }
                }
                if i.request.target.port() % 2 == 0 {
                    let _ = i.accept();
                } else {
                    i.reject(http_status());
                }
            },
            tokio::time::sleep(Duration::from_millis(50)),
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(feed, serve) }).await;
    });
});

fn http_status() -> zring_hbone::server::StatusCode {
    zring_hbone::server::StatusCode::UNAUTHORIZED
}
