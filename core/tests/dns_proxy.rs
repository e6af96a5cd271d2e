//! The DNS proxy of a node proxy on loopback (not in-pod): mesh names answered from the config
//! (full, short and search-extended forms, A and AAAA, over UDP and TCP), other names forwarded
//! to the upstream, an upstream that stays silent turned into SERVFAIL, a config change seen
//! by the next question, and bad input (short packets, garbage, over-long names, a flood)
//! answered or dropped and counted while good questions keep being answered.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use hickory_proto::{op::ResponseCode, rr::RecordType};

mod common;

use common::{
    dns::{self, answers, Upstream},
    mesh::{metric, Node},
    tmp,
};

const HOST: [u8; 4] = [127, 0, 53, 1];
const SLEEP: [u8; 4] = [127, 0, 53, 2];

fn config(vip: &str) -> String {
    format!(
        r#"workloads:
- uid: c//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["127.0.53.2"]
  protocol: HBONE
  node: node-a
- uid: c//v1/Pod/default/reviews
  name: reviews-v1
  namespace: default
  serviceAccount: reviews
  workloadIps: ["127.0.53.3"]
  protocol: HBONE
  node: node-a
  services:
    "default/reviews.default.svc.cluster.local":
      9080: 9080
services:
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: ["/{vip}", "/fd00::53:20"]
  ports:
    9080: 9080
policies: []
"#
    )
}

/// A node proxy on `host` with `mesh` and its DNS proxy on `host`:15053, forwarding to a test
/// upstream on `host` with `timeout` per question; ready.
fn dns_node(
    tag: &str,
    host: [u8; 4],
    mesh: String,
    timeout: &str,
) -> (Node, Upstream, SocketAddr, std::path::PathBuf) {
    let dir = tmp(tag);
    let ca = common::ca_init(&dir);
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, mesh).unwrap();
    let upstream = Upstream::start(IpAddr::from(host), 0);
    let server = SocketAddr::from((host, 15053));
    let (srv, up) = (server.to_string(), upstream.addr.to_string());
    let mut node = Node::start(
        "node-a",
        IpAddr::from(host),
        &cfg,
        &ca,
        &[
            "--dns-addr",
            &srv,
            "--dns-upstream",
            &up,
            "--dns-timeout",
            timeout,
        ],
    );
    node.wait_ready();
    (node, upstream, server, cfg)
}

#[test]
fn dns_answers_mesh_names_forwards_the_rest_and_survives_bad_input() {
    let (node, upstream, server, cfg) = dns_node("dns-proxy", HOST, config("10.96.53.20"), "500ms");
    let sleep = Some(IpAddr::from(SLEEP));
    if dns::udp_try(server, sleep, "reviews.", RecordType::A).is_none() {
        panic!("the DNS proxy does not answer:\n{}", node.proc.log());
    }

    // Mesh names, as a pod in `default` asks them (its namespace comes from its address).
    for name in [
        "reviews.default.svc.cluster.local.",
        "reviews.",
        "reviews.default.",
        "Reviews.Default.SVC.cluster.local.",
    ] {
        let m = dns::udp_try(server, sleep, name, RecordType::A)
            .unwrap_or_else(|| panic!("no answer for {name}:\n{}", node.proc.log()));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(m.metadata.authoritative, "{name}");
        assert_eq!(answers(&m), [format!("{name} 10.96.53.20")], "{name}");
    }
    // A name the resolver already extended with the pod's first search domain.
    let m = dns::udp(
        server,
        sleep,
        "reviews.default.default.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(
        answers(&m),
        [
            "reviews.default.default.svc.cluster.local. reviews.default.",
            "reviews.default. 10.96.53.20"
        ]
    );
    let m = dns::udp(server, sleep, "reviews.", RecordType::AAAA);
    assert_eq!(answers(&m), ["reviews. fd00::53:20"]);
    // `reviews` from an address that is no pod of `default`: not a mesh name; forwarded.
    let m = dns::udp(server, None, "reviews.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = dns::tcp(server, "reviews.default.svc.cluster.local.", RecordType::A);
    assert_eq!(
        answers(&m),
        ["reviews.default.svc.cluster.local. 10.96.53.20"]
    );

    // Outside names go to the upstream, over the transport they came on.
    let before = upstream
        .questions
        .load(std::sync::atomic::Ordering::Relaxed);
    let m = dns::udp(server, sleep, dns::OUTSIDE, RecordType::A);
    assert_eq!(answers(&m), [format!("{} 10.250.0.9", dns::OUTSIDE)]);
    assert!(!m.metadata.authoritative);
    let m = dns::tcp(server, dns::OUTSIDE, RecordType::A);
    assert_eq!(answers(&m), [format!("{} 10.250.0.9", dns::OUTSIDE)]);
    let m = dns::udp(server, sleep, "nowhere.example.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(
        upstream
            .questions
            .load(std::sync::atomic::Ordering::Relaxed)
            >= before + 3
    );
    // An upstream that never answers: SERVFAIL after --dns-timeout, counted and logged.
    let t = Instant::now();
    let m = dns::udp(server, sleep, dns::SILENT, RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );

    // The config changes: the next question sees the new VIP.
    std::fs::write(&cfg, config("10.96.53.21")).unwrap();
    common::wait_until(
        Duration::from_secs(10),
        || answers(&dns::udp(server, sleep, "reviews.", RecordType::A)) == ["reviews. 10.96.53.21"],
        || format!("the new VIP was never answered:\n{}", node.proc.log()),
    );

    // Bad input. Too short for a header: dropped.
    let s = UdpSocket::bind("127.0.53.2:0").unwrap();
    assert!(dns::udp_raw(&s, server, &[1, 2, 3], Duration::from_millis(300)).is_none());
    // A header and garbage: FORMERR with the id.
    let garbage = [0xbe, 0xef, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff];
    let m = dns::udp_raw(&s, server, &garbage, Duration::from_secs(5)).expect("FORMERR");
    assert_eq!(m.metadata.id, 0xbeef);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A name of 320 bytes (the limit is 255).
    let mut long = vec![0xca, 0xfe, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for _ in 0..5 {
        long.push(63);
        long.extend_from_slice(&[b'a'; 63]);
    }
    long.extend_from_slice(&[0, 0, 1, 0, 1]);
    let m = dns::udp_raw(&s, server, &long, Duration::from_secs(5)).expect("FORMERR");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    let m = dns::tcp_raw(server, &long).expect("FORMERR over TCP");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // Two questions in one query: FORMERR.
    let mut two = zring_core::dns::query(9, "reviews.", RecordType::A);
    two[5] = 2;
    let question = two[12..].to_vec();
    two.extend_from_slice(&question);
    let m = dns::udp_raw(&s, server, &two, Duration::from_secs(5)).expect("FORMERR");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A flood of garbage, then a good question: answered.
    let flood = UdpSocket::bind("127.0.53.4:0").unwrap();
    for i in 0..20_000u32 {
        let mut p = garbage.to_vec();
        p[..4].copy_from_slice(&i.to_be_bytes());
        let _ = flood.send_to(&p, server);
    }
    // (The kernel drops what the socket buffer cannot hold, the good question too at first:
    // asked again each second, as resolvers do.)
    let s = UdpSocket::bind("127.0.53.2:0").unwrap();
    let q = zring_core::dns::query(77, "reviews.default.svc.cluster.local.", RecordType::A);
    let m = (0..10)
        .find_map(|_| dns::udp_raw(&s, server, &q, Duration::from_secs(1)))
        .unwrap_or_else(|| panic!("no answer after the flood:\n{}", node.proc.log()));
    assert_eq!(
        answers(&m),
        ["reviews.default.svc.cluster.local. 10.96.53.21"]
    );

    let text = node.metrics();
    let malformed = metric(&text, "zring_dns_requests_total", &["result=\"malformed\""]).unwrap();
    assert!(malformed >= 4, "{malformed}\n{text}");
    assert!(metric(&text, "zring_dns_requests_total", &["result=\"local\""]).unwrap() >= 9);
    assert!(metric(&text, "zring_dns_requests_total", &["result=\"forwarded\""]).unwrap() >= 4);
    assert_eq!(
        metric(
            &text,
            "zring_dns_requests_total",
            &["result=\"upstream_failure\""]
        ),
        Some(1)
    );
    assert!(metric(&text, "istio_dns_upstream_failures_total", &[]).unwrap() >= 1);
    assert!(metric(&text, "istio_dns_requests_total", &[]).unwrap() >= 20);
    let log = node.proc.log();
    assert!(log.contains("no upstream answered; SERVFAIL"), "{log}");
    assert!(log.contains("malformed query"), "{log}");
    // Nothing else was disturbed: still ready.
    assert_eq!(
        common::mesh::http_get(node.ready, "GET", "/healthz/ready").0,
        200
    );
}

/// The robustness review's D1, D2, D4 and D7. A DNS *response* (QR=1) is never answered, so
/// no spoofed datagram can make the proxy talk to itself (or to another DNS server) for ever;
/// one client holding more unanswered forwards than the whole in-flight cap cannot make
/// another pod's mesh names (answered locally, no slot needed) or forwarded names fail;
/// an EDNS version other than 0 gets BADVERS; a burst of bad packets writes a bounded log.
#[test]
fn dns_never_answers_responses_and_one_client_cannot_starve_the_others() {
    let (node, _upstream, server, _cfg) = dns_node(
        "dns-fair",
        [127, 0, 54, 1],
        config("10.96.54.20").replace("127.0.53.", "127.0.54."),
        "4s",
    );
    let sleep = Some(IpAddr::from([127, 0, 54, 2]));
    dns::udp_try(server, sleep, "reviews.", RecordType::A)
        .unwrap_or_else(|| panic!("the DNS proxy does not answer:\n{}", node.proc.log()));

    // A response sent to the proxy gets nothing back, and is counted as dropped.
    let s = UdpSocket::bind("127.0.54.7:0").unwrap();
    let mut response = zring_core::dns::query(0x0bad, "reviews.", RecordType::A);
    response[2] |= 0x80;
    assert!(
        dns::udp_raw(&s, server, &response, Duration::from_millis(500)).is_none(),
        "a DNS response was answered"
    );
    // EDNS version 1: BADVERS (RFC 6891 6.1.3).
    let mut q = hickory_proto::op::Message::query();
    q.metadata.id = 0x00ed;
    q.add_query(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii("reviews.").unwrap(),
        RecordType::A,
    ));
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_version(1);
    q.set_edns(edns);
    let m = dns::udp_raw(&s, server, &q.to_vec().unwrap(), Duration::from_secs(5))
        .expect("an answer to EDNS version 1");
    // 16 is BADVERS in an OPT answer (hickory reads 16 back as BADSIG, its TSIG twin).
    assert_eq!(u16::from(m.metadata.response_code), 16, "{m:?}");

    // One client asks 1,300 names the upstream never answers (more than the 1,024 in flight
    // the proxy allows in all), paced so the kernel keeps them all.
    let greedy = UdpSocket::bind("127.0.54.6:0").unwrap();
    for i in 0..1300u16 {
        let q = zring_core::dns::query(i, dns::SILENT, RecordType::A);
        greedy.send_to(&q, server).unwrap();
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    // Meanwhile sleep's mesh name and an outside name are answered.
    let m = dns::udp(
        server,
        sleep,
        "reviews.default.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m:?}");
    assert_eq!(
        answers(&m),
        ["reviews.default.svc.cluster.local. 10.96.54.20"]
    );
    let m = dns::udp(server, sleep, dns::OUTSIDE, RecordType::A);
    assert_eq!(answers(&m), [format!("{} 10.250.0.9", dns::OUTSIDE)]);

    // 2,000 bad packets in a burst: counted, but only a few log lines.
    let garbage = [0xbe, 0xef, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff];
    for _ in 0..2000 {
        let _ = s.send_to(&garbage, server);
    }
    std::thread::sleep(Duration::from_millis(500));
    let text = node.metrics();
    assert!(
        metric(&text, "zring_dns_requests_total", &["result=\"dropped\""]).unwrap_or(0) >= 1,
        "{text}"
    );
    let lines = node.proc.log().matches("malformed query").count();
    assert!(
        lines <= 40,
        "{lines} log lines for one burst of bad packets"
    );
}
