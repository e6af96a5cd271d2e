//! Mutual TLS with SPIFFE identities: who may connect, what the client insists on, rotation.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use zring_hbone::{
    ca::LocalCa,
    client,
    tls::{self, classify_handshake, HandshakeFailure},
    H2Settings, TokioLocal,
};

#[test]
fn handshake_succeeds_and_the_server_sees_the_client_identity() {
    run_local(async {
        let mesh = Mesh::new();
        let (client_id, server_id) = (id("default", "sleep"), id("default", "productpage"));
        let srv = hbone_server(
            mesh.server_config(&server_id),
            H2Settings::default(),
            relay_handler(),
        )
        .await;
        let tls = dial_tls(srv.addr, mesh.client_config(&client_id, &server_id))
            .await
            .expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(tls::peer_identity(tls.get_ref().1), Some(server_id));
        drop(tls);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(srv.peers.borrow().as_slice(), &[Some(client_id)]);
    });
}

#[test]
fn server_with_an_unexpected_identity_is_rejected_with_a_distinct_error() {
    run_local(async {
        let mesh = Mesh::new();
        let srv = hbone_server(
            mesh.server_config(&id("default", "impostor")),
            H2Settings::default(),
            relay_handler(),
        )
        .await;
        let err = dial_tls(
            srv.addr,
            mesh.client_config(&id("default", "sleep"), &id("default", "productpage")),
        )
        .await
        .expect_err("must fail");
        match classify_handshake(err) {
            HandshakeFailure::WrongIdentity(w) => {
                assert_eq!(w.got, Some(id("default", "impostor")));
                assert!(
                    w.to_string().contains(
                        "is not the expected spiffe://cluster.local/ns/default/sa/productpage"
                    ),
                    "{w}"
                );
            }
            other => panic!("expected WrongIdentity, got {other}"),
        }
    });
}

#[test]
fn client_without_a_certificate_is_rejected() {
    run_local(async {
        let mesh = Mesh::new();
        let srv = hbone_server(
            mesh.server_config(&id("default", "productpage")),
            H2Settings::default(),
            relay_handler(),
        )
        .await;
        // A client that trusts the server but presents nothing.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(mesh.ca.root().clone()).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // The server name check would fail first with webpki, so connect with an IP the cert
        // does not cover: what matters is the server's verdict, seen as a closed connection.
        let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        let r = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(tls::server_name(srv.addr.ip()), tcp)
            .await;
        if let Ok(mut s) = r {
            use tokio::io::AsyncReadExt;
            let mut b = [0u8; 1];
            assert!(
                s.read(&mut b).await.is_err() || b == [0],
                "server must refuse a client without certificate"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(srv.peers.borrow().is_empty(), "no connection served");
    });
}

#[test]
fn certificates_from_another_ca_are_rejected_both_ways() {
    run_local(async {
        let mesh = Mesh::new();
        let other = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let server_id = id("default", "productpage");
        let srv = hbone_server(
            mesh.server_config(&server_id),
            H2Settings::default(),
            relay_handler(),
        )
        .await;
        // Client cert from another CA (but trusting ours).
        let foreign = other
            .issue(&id("default", "sleep"), Duration::from_secs(3600))
            .unwrap();
        let cfg = tls::client_config(&foreign, &mesh.roots(), vec![server_id.clone()]).unwrap();
        let r = dial_tls(srv.addr, cfg).await;
        if let Ok(mut s) = r {
            use tokio::io::AsyncReadExt;
            let mut b = [0u8; 1];
            assert!(
                s.read(&mut b).await.is_err(),
                "server must refuse a foreign client certificate"
            );
        }
        // Server cert from another CA.
        let srv2 = hbone_server(
            tls::server_config(
                &other.issue(&server_id, Duration::from_secs(3600)).unwrap(),
                &mesh.roots(),
            )
            .unwrap(),
            H2Settings::default(),
            relay_handler(),
        )
        .await;
        let err = dial_tls(
            srv2.addr,
            mesh.client_config(&id("default", "sleep"), &server_id),
        )
        .await
        .expect_err("foreign server");
        assert!(matches!(
            classify_handshake(err),
            HandshakeFailure::BadCertificate(_)
        ));
        assert!(srv.peers.borrow().is_empty());
    });
}

#[test]
fn expired_certificates_are_rejected() {
    run_local(async {
        let mesh = Mesh::new();
        let server_id = id("default", "productpage");
        let now = time::OffsetDateTime::now_utc();
        let expired = mesh
            .ca
            .issue_window(
                &server_id,
                now - time::Duration::hours(2),
                now - time::Duration::hours(1),
            )
            .unwrap();
        let srv = hbone_server(
            tls::server_config(&expired, &mesh.roots()).unwrap(),
            H2Settings::default(),
            relay_handler(),
        )
        .await;
        let err = dial_tls(
            srv.addr,
            mesh.client_config(&id("default", "sleep"), &server_id),
        )
        .await
        .expect_err("expired");
        match classify_handshake(err) {
            HandshakeFailure::BadCertificate(s) => {
                assert!(s.to_lowercase().contains("expired"), "{s}")
            }
            other => panic!("expected BadCertificate, got {other}"),
        }
    });
}

#[test]
fn rotation_changes_new_connections_and_leaves_live_streams_alone() {
    run_local(async {
        let mesh = Mesh::new();
        let server_id = id("default", "productpage");
        let first = mesh.cert(&server_id);
        let srv = hbone_server(
            tls::server_config(&first, &mesh.roots()).unwrap(),
            H2Settings::default(),
            relay_handler(),
        )
        .await;
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::task::spawn_local(async move {
            loop {
                let Ok((mut c, _)) = echo.accept().await else {
                    return;
                };
                tokio::task::spawn_local(async move {
                    let (mut r, mut w) = c.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let client_cfg = mesh.client_config(&id("default", "sleep"), &server_id);
        let tls1 = dial_tls(srv.addr, client_cfg.clone()).await.unwrap();
        let serial1 = tls1.get_ref().1.peer_certificates().unwrap()[0].clone();
        let (send, _) = client::handshake(tls1, &H2Settings::default(), &TokioLocal)
            .await
            .unwrap();
        let mut live = zring_hbone::client::open(&send, echo_addr, &Default::default())
            .await
            .unwrap();
        // Rotate the server's certificate.
        let second = mesh.cert(&server_id);
        srv.config
            .store(tls::server_config(&second, &mesh.roots()).unwrap());
        let tls2 = dial_tls(srv.addr, client_cfg).await.unwrap();
        let serial2 = tls2.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_ne!(
            serial1, serial2,
            "a new connection presents the new certificate"
        );
        assert_eq!(serial2, second.chain[0]);
        // The stream opened before the rotation still carries bytes.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        live.write_all(b"still here").await.unwrap();
        let mut got = [0u8; 10];
        live.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"still here");
    });
}

/// A second connection with the same client config resumes the session from the ticket the
/// first one received (no certificate exchange), and both sides still see each other's
/// identity. A server with another config (a rotated certificate, another pod's identity on
/// the same node) cannot read that ticket: the handshake is a full one, verified again.
#[test]
fn a_redial_with_the_same_client_config_resumes_by_ticket_and_keeps_both_identities() {
    run_local(async {
        let mesh = Mesh::new();
        let (client_id, server_id) = (id("default", "sleep"), id("default", "productpage"));
        let server_cfg = mesh.server_config(&server_id);
        // The server keeps nothing per session: the session travels sealed in the ticket.
        assert!(server_cfg.ticketer.enabled());
        assert!(!server_cfg.session_storage.can_cache());
        let srv = hbone_server(server_cfg, H2Settings::default(), relay_handler()).await;
        let cfg = mesh.client_config(&client_id, &server_id);
        let mut kinds = Vec::new();
        for _ in 0..3 {
            // The h2 handshake reads past the TLS handshake, which takes in the ticket.
            let tls = dial_tls(srv.addr, cfg.clone()).await.expect("handshake");
            kinds.push(tls.get_ref().1.handshake_kind());
            assert_eq!(tls::peer_identity(tls.get_ref().1), Some(server_id.clone()));
            let (send, _conn) = client::handshake(tls, &H2Settings::default(), &TokioLocal)
                .await
                .expect("h2 handshake");
            let _send = send.ready().await.expect("h2 ready");
            // Let the connection read the server's SETTINGS and, behind them, the ticket.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        use rustls::HandshakeKind::{Full, Resumed};
        assert_eq!(kinds, vec![Some(Full), Some(Resumed), Some(Resumed)]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            srv.peers.borrow().as_slice(),
            &[
                Some(client_id.clone()),
                Some(client_id.clone()),
                Some(client_id.clone())
            ]
        );

        // The client holds the ticket the third connection brought (one per handshake). A new
        // server config has a ticketer of its own, which cannot open it: a full handshake.
        srv.config.store(mesh.server_config(&server_id));
        let tls = dial_tls(srv.addr, cfg.clone()).await.expect("handshake");
        assert_eq!(tls.get_ref().1.handshake_kind(), Some(Full));
        assert_eq!(tls::peer_identity(tls.get_ref().1), Some(server_id.clone()));
    });
}

/// Security review M5: a client certificate from the mesh's own root, but for another trust
/// domain, fails the handshake at 15008 (ztunnel's `TrustDomainVerifier`): it would otherwise
/// pass policies written against namespaces or service accounts.
#[test]
fn a_client_of_a_foreign_trust_domain_is_refused_in_the_handshake() {
    run_local(async {
        let mesh = Mesh::new();
        let srv = hbone_server(
            mesh.server_config(&id("default", "productpage")),
            H2Settings::default(),
            relay_handler(),
        )
        .await;
        let evil = zring_hbone::SpiffeId::new("evil.example", "default", "sleep").unwrap();
        let cfg = tls::client_config(
            &mesh.cert(&evil),
            &mesh.roots(),
            vec![id("default", "productpage")],
        )
        .unwrap();
        if let Ok(mut s) = dial_tls(srv.addr, cfg).await {
            use tokio::io::AsyncReadExt;
            let mut b = [0u8; 1];
            assert!(
                s.read(&mut b).await.is_err() || b == [0],
                "the server served a foreign trust domain"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(srv.peers.borrow().is_empty(), "no connection served");
        // The same client in the mesh's trust domain is served.
        let ok = tls::client_config(
            &mesh.cert(&id("default", "sleep")),
            &mesh.roots(),
            vec![id("default", "productpage")],
        )
        .unwrap();
        assert!(dial_tls(srv.addr, ok).await.is_ok());
    });
}

/// An X.509-SVID has exactly one URI SAN: a certificate with two, or with a SPIFFE id holding
/// a NUL, has no identity (CVE-2025-66220 class), and one lone valid SPIFFE id is read.
#[test]
fn only_a_single_well_formed_uri_san_is_an_identity() {
    let cert = |uris: &[&str]| {
        let mut p = rcgen::CertificateParams::default();
        for u in uris {
            p.subject_alt_names
                .push(rcgen::SanType::URI((*u).try_into().unwrap()));
        }
        p.subject_alt_names
            .push(rcgen::SanType::DnsName("x.example".try_into().unwrap()));
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    };
    let id_of = |uris: &[&str]| tls::leaf_info(&cert(uris)).unwrap().identity;
    let sleep = "spiffe://cluster.local/ns/default/sa/sleep";
    assert_eq!(id_of(&[sleep]), Some(id("default", "sleep")));
    assert_eq!(id_of(&[]), None);
    assert_eq!(
        id_of(&[sleep, "spiffe://cluster.local/ns/default/sa/admin"]),
        None
    );
    assert_eq!(id_of(&[sleep, "https://example.com/"]), None);
    assert_eq!(
        id_of(&["spiffe://cluster.local/ns/default/sa/sle\0ep"]),
        None
    );
}
