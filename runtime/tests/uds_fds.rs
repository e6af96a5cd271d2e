//! SEQPACKET messages with descriptors over a real unix socket.

use std::{io::Read, os::fd::AsFd, time::Duration};

use zring_runtime::{net::NetNs, uds::SeqPacket, uds::SeqPacketListener};

fn path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("zring-uds-{tag}-{}.sock", std::process::id()))
}

#[test]
fn messages_keep_their_boundaries_and_carry_descriptors() {
    let p = path("fds");
    let l = SeqPacketListener::bind(&p).unwrap();
    let server = std::thread::spawn(move || {
        let c = l.accept().unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = c.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"first");
        assert_eq!(fds.len(), 2);
        let (n, fds2) = c.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"second, no fds");
        assert!(fds2.is_empty());
        // The first descriptor is a network namespace; the second the write end of a pipe.
        let ns = NetNs::from_fd(fds.into_iter().next().unwrap()).unwrap();
        c.send(b"ack", &[]).unwrap();
        ns.inode().unwrap()
    });
    let c = SeqPacket::connect(&p).unwrap();
    let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
    let (mut r, w) = std::io::pipe().unwrap();
    c.send(b"first", &[ns.as_fd(), w.as_fd()]).unwrap();
    c.send(b"second, no fds", &[]).unwrap();
    drop(w);
    let mut buf = [0u8; 16];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (n, _) = c.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ack");
    let inode = server.join().unwrap();
    assert_eq!(inode, NetNs::current().unwrap().inode().unwrap());
    // The server dropped its copy of the pipe's write end and we dropped ours: EOF.
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    let _ = std::fs::remove_file(&p);
}

#[test]
fn an_oversized_message_is_an_error_and_a_closed_peer_reads_as_zero() {
    let p = path("big");
    let l = SeqPacketListener::bind(&p).unwrap();
    let t = std::thread::spawn(move || {
        let c = l.accept().unwrap();
        c.send(&[7u8; 100], &[]).unwrap();
    });
    let c = SeqPacket::connect(&p).unwrap();
    t.join().unwrap();
    let mut small = [0u8; 10];
    let e = c.recv(&mut small).unwrap_err();
    assert!(e.to_string().contains("larger than 10 bytes"), "{e}");
    let (n, fds) = c.recv(&mut small).unwrap();
    assert_eq!((n, fds.len()), (0, 0));
    let _ = std::fs::remove_file(&p);
}
