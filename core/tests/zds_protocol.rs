//! ZDS over a real SEQPACKET socket with real descriptors: zring's client against a raw agent
//! (malformed and hostile messages) and against `zring node-agent` (add, remove, snapshot after
//! an agent restart).

use std::{
    collections::HashSet,
    os::fd::AsFd,
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prost::Message;
use zring_core::zds::{
    client::{self, Pod, PodHandler},
    proto::{self, workload_request::Payload},
};
use zring_runtime::{
    net::NetNs,
    uds::{SeqPacket, SeqPacketListener},
    ShutdownTrigger,
};

mod common;

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl PodHandler for Recorder {
    fn add(&mut self, pod: Pod) -> Result<(), String> {
        let inode = pod.netns.inode().map_err(|e| e.to_string())?;
        self.0
            .lock()
            .unwrap()
            .push(format!("add {} {} {inode}", pod.uid, pod.info.name));
        Ok(())
    }
    fn del(&mut self, uid: &str) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("del {uid}"));
        Ok(())
    }
    fn retain(&mut self, keep: &HashSet<String>) {
        let mut k: Vec<_> = keep.iter().cloned().collect();
        k.sort();
        self.0
            .lock()
            .unwrap()
            .push(format!("retain {}", k.join(",")));
    }
}

impl Recorder {
    fn events(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    fn wait_for(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.events().iter().any(|e| e.starts_with(what)) {
            assert!(
                Instant::now() < deadline,
                "never saw {what:?}: {:?}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn sock(tag: &str) -> PathBuf {
    common::tmp(&format!("zds-{tag}")).with_extension("sock")
}

fn my_netns_inode() -> u64 {
    NetNs::current().unwrap().inode().unwrap()
}

/// Send a request from the raw agent side; return the ack's error text.
fn ask(conn: &SeqPacket, req: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) -> String {
    conn.send(req, fds).unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = conn.recv(&mut buf).unwrap();
    match proto::WorkloadResponse::decode(&buf[..n]).unwrap().payload {
        Some(proto::workload_response::Payload::Ack(a)) => a.error,
        None => panic!("no ack"),
    }
}

fn add(uid: &str) -> Vec<u8> {
    proto::WorkloadRequest {
        payload: Some(Payload::Add(proto::AddWorkload {
            uid: uid.into(),
            workload_info: Some(proto::WorkloadInfo {
                name: format!("pod-{uid}"),
                namespace: "default".into(),
                service_account: "sleep".into(),
            }),
        })),
    }
    .encode_to_vec()
}

#[test]
fn the_client_says_hello_acks_everything_and_refuses_bad_messages() {
    let path = sock("raw");
    let l = SeqPacketListener::bind(&path).unwrap();
    let rec = Recorder::default();
    let trigger = ShutdownTrigger::new();
    let (mut r, p, t) = (rec.clone(), path.clone(), trigger.clone());
    let client = std::thread::spawn(move || client::run(p, &mut r, &t));
    let conn = l
        .accept_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("client connects");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = conn.recv(&mut buf).unwrap();
    // ZdsHello { version: V1 } is field 1, varint 1.
    assert_eq!(&buf[..n], &[0x08, 0x01]);

    let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
    assert_eq!(ask(&conn, &add("a"), &[ns.as_fd()]), "");
    assert_eq!(rec.events(), [format!("add a pod-a {}", my_netns_inode())]);
    // Hostile or broken requests: each gets an error ack, nothing else happens.
    let (pipe_r, _pipe_w) = std::io::pipe().unwrap();
    assert!(ask(&conn, &add("b"), &[pipe_r.as_fd()]).contains("not a network namespace"));
    assert!(ask(&conn, &add("c"), &[]).contains("exactly one descriptor"));
    assert!(ask(&conn, &[0xff, 0xff, 0xff], &[]).contains("malformed WorkloadRequest"));
    // A message type this client does not know (field 9): decodes with no payload.
    assert!(ask(&conn, &[0x48, 0x01], &[]).contains("without a payload"));
    let keep = proto::WorkloadRequest {
        payload: Some(Payload::Keep(proto::KeepWorkload { uid: "k".into() })),
    };
    assert_eq!(ask(&conn, &keep.encode_to_vec(), &[]), "");
    let snap = proto::WorkloadRequest {
        payload: Some(Payload::SnapshotSent(proto::SnapshotSent {})),
    };
    assert_eq!(ask(&conn, &snap.encode_to_vec(), &[]), "");
    assert!(ask(&conn, &keep.encode_to_vec(), &[]).contains("after SnapshotSent"));
    assert!(ask(&conn, &snap.encode_to_vec(), &[]).contains("second SnapshotSent"));
    let del = proto::WorkloadRequest {
        payload: Some(Payload::Del(proto::DelWorkload { uid: "a".into() })),
    };
    assert_eq!(ask(&conn, &del.encode_to_vec(), &[]), "");
    assert_eq!(
        rec.events()[1..],
        ["retain a,k".to_string(), "del a".to_string()]
    );
    // The agent goes away and comes back: the client reconnects and says hello again.
    drop(conn);
    let conn = l
        .accept_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("client reconnects");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (n, _) = conn.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &[0x08, 0x01]);
    trigger.trigger();
    client.join().unwrap();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn node_agent_enrolls_and_removes_pods_and_resends_its_snapshot() {
    let path = sock("agent");
    let spawn_agent = || {
        common::Proc::spawn(&[
            "node-agent",
            "run",
            "--socket",
            path.to_str().unwrap(),
            "--no-rules",
        ])
    };
    let mut agent = spawn_agent();
    let control = zring_core::cmd::node_agent::control_path(&path);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.exists() {
        assert!(
            Instant::now() < deadline,
            "agent never listened:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rec = Recorder::default();
    let trigger = ShutdownTrigger::new();
    let (mut r, p, t) = (rec.clone(), path.clone(), trigger.clone());
    let client = std::thread::spawn(move || client::run(p, &mut r, &t));
    rec.wait_for("retain");
    let cli = |args: &[&str]| {
        Command::new(common::ZRING)
            .args(["node-agent"])
            .args(args)
            .args(["--socket", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = cli(&[
        "add",
        "--netns",
        "/proc/self/ns/net",
        "--uid",
        "u1",
        "--name",
        "sleep-1",
        "--namespace",
        "default",
        "--service-account",
        "sleep",
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    rec.wait_for("add u1");
    // The agent checks the namespace before it bothers the proxy.
    let out = cli(&[
        "add",
        "--netns",
        "/etc/hostname",
        "--uid",
        "u2",
        "--name",
        "x",
        "--namespace",
        "default",
        "--service-account",
        "x",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["remove", "--uid", "u1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rec.wait_for("del u1");
    let out = cli(&[
        "add",
        "--netns",
        "/proc/self/ns/net",
        "--uid",
        "u3",
        "--name",
        "sleep-3",
        "--namespace",
        "default",
        "--service-account",
        "sleep",
    ]);
    assert!(out.status.success());
    rec.wait_for("add u3");
    // A restarted agent has an empty cache: its snapshot makes the proxy drop u3.
    drop(agent);
    agent = spawn_agent();
    let deadline = Instant::now() + Duration::from_secs(15);
    while rec
        .events()
        .iter()
        .filter(|e| e.starts_with("retain"))
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "no second snapshot: {:?}\n{}",
            rec.events(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rec.events().last().unwrap(), "retain ");
    trigger.trigger();
    client.join().unwrap();
    drop(agent);
    let _ = std::fs::remove_file(&path);
}
