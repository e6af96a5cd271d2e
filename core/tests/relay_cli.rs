//! The `zring relay` binary: backend fallback under a real seccomp refusal, SIGTERM drain, and a
//! dead upstream.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

mod common;

use common::{echo, free_port, Proc};

fn spawn(args: &[&str], deny_uring: bool) -> Proc {
    Proc::spawn_with(args, |cmd| {
        if deny_uring {
            zring_runtime::sys::deny_io_uring(cmd);
        }
    })
}

fn echo_roundtrip(addr: SocketAddr) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"ping through zring").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"ping through zring");
}

#[test]
fn auto_falls_back_to_epoll_when_seccomp_denies_io_uring() {
    let up = echo();
    let listen = free_port();
    let mut p = spawn(
        &[
            "relay",
            "--listen",
            &listen.to_string(),
            "--to",
            &up.to_string(),
            "--io",
            "auto",
            "--workers",
            "1",
        ],
        true,
    );
    p.wait_listening(listen);
    echo_roundtrip(listen);
    let log = p.log();
    assert!(
        log.contains("falling back to epoll"),
        "log must say why epoll runs:\n{log}"
    );
    assert!(
        log.contains("Operation not permitted"),
        "log must carry the kernel's refusal:\n{log}"
    );
}

#[test]
fn forced_uring_fails_clearly_when_seccomp_denies_it() {
    let listen = free_port();
    let mut p = spawn(
        &[
            "relay",
            "--listen",
            &listen.to_string(),
            "--to",
            "127.0.0.1:9",
            "--io",
            "uring",
        ],
        true,
    );
    let st = p.wait_exit(Duration::from_secs(10));
    assert!(!st.success(), "--io uring must fail without io_uring");
    let log = p.log();
    assert!(
        log.contains("--io uring was requested but io_uring is unavailable"),
        "unclear error:\n{log}"
    );
}

/// mimalloc advises huge pages for its arena; a proxy's small heap would then cost 2 MiB per
/// touched stretch (27 MB fresh RSS instead of 12.5). zring turns them off before its first
/// allocation: the flag is set and no anonymous huge page is mapped, even after traffic.
#[test]
fn runs_without_transparent_huge_pages_from_the_first_allocation() {
    let up = echo();
    let listen = free_port();
    let (l, u) = (listen.to_string(), up.to_string());
    let mut p = spawn(&["relay", "--listen", &l, "--to", &u], false);
    p.wait_listening(listen);
    for _ in 0..20 {
        echo_roundtrip(listen);
    }
    let pid = p.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let thp = status.lines().find(|l| l.starts_with("THP_enabled:"));
    if let Some(line) = thp {
        assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    } else {
        eprintln!("kernel without THP_enabled in /proc/PID/status: flag not checked, RSS is");
    }
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let huge = rollup
        .lines()
        .find(|l| l.starts_with("AnonHugePages:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap();
    assert_eq!(huge, 0, "anonymous huge pages mapped:\n{rollup}");
}

/// glibc < 2.39 copies with `rep movsb` on AMD cores, 15x slower when the destination sits a
/// few bytes past the source's page offset, which is every TLS record rustls builds from a
/// page-aligned read. zring then runs itself again with the tunable that keeps `rep movsb` to
/// copies of 1 MiB and more: same pid and arguments, other tunables kept, the user's own value
/// of that tunable left alone. Elsewhere it must leave `GLIBC_TUNABLES` as it found it.
#[test]
fn runs_again_with_the_rep_movsb_tunable_where_glibc_copies_slowly() {
    let needed = zring_runtime::sys::memcpy_needs_rep_movsb_tunable();
    let ours = "glibc.cpu.x86_rep_movsb_threshold=1048576";
    // (preset, what GLIBC_TUNABLES must start with, what else the environment must hold).
    // glibc 2.36 cuts the string in `/proc/PID/environ` after the first tunable it applied, so
    // the rest is looked for anywhere in the environment block.
    let other = "glibc.malloc.check=0";
    let user = "glibc.cpu.x86_rep_movsb_threshold=2112";
    let cases = [
        (None, needed.then_some(ours), None),
        (
            Some(other),
            Some(if needed { ours } else { other }),
            Some(other),
        ),
        (Some(user), Some(user), None),
    ];
    let up = echo();
    for (preset, want, also) in cases {
        let listen = free_port();
        let (l, u) = (listen.to_string(), up.to_string());
        let args = ["relay", "--listen", &l, "--to", &u, "--workers", "1"];
        let mut p = Proc::spawn_with(&args, |cmd| {
            match preset {
                Some(v) => cmd.env("GLIBC_TUNABLES", v),
                None => cmd.env_remove("GLIBC_TUNABLES"),
            };
        });
        p.wait_listening(listen);
        echo_roundtrip(listen);
        // The pid we spawned is the one serving: a re-run replaces the program in place.
        let pid = p.child.id();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let got = environ
            .split(|b| *b == 0)
            .filter_map(|v| v.strip_prefix(b"GLIBC_TUNABLES="))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .next();
        match (&got, want) {
            (Some(g), Some(w)) => assert!(g.starts_with(w), "with {preset:?}: {g}, want {w}"),
            (None, None) => {}
            _ => panic!("GLIBC_TUNABLES with {preset:?} preset: {got:?}, want {want:?}"),
        }
        if let Some(also) = also {
            let found = environ
                .split(|b| *b == 0)
                .any(|v| v.windows(also.len()).any(|w| w == also.as_bytes()));
            assert!(found, "the preset {also} is kept");
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let argv: Vec<&[u8]> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .collect();
        let want_args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        assert_eq!(&argv[1..], &want_args[..], "arguments after a re-run");
        assert!(
            argv[0].ends_with(b"zring"),
            "argv[0] kept: {:?}",
            String::from_utf8_lossy(argv[0])
        );
    }
    if !needed {
        eprintln!(
            "NOTE: this CPU and glibc copy fast already; checked only that zring leaves \
             GLIBC_TUNABLES as it found it"
        );
    }
}

#[test]
fn dead_upstream_closes_the_client_promptly_and_logs_why() {
    let listen = free_port();
    let dead = free_port(); // bound and released: nothing listens there
    let mut p = spawn(
        &[
            "relay",
            "--listen",
            &listen.to_string(),
            "--to",
            &dead.to_string(),
            "--workers",
            "1",
        ],
        false,
    );
    p.wait_listening(listen);
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let r = c.read(&mut buf);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "client waited {:?}",
        t.elapsed()
    );
    match r {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
    std::thread::sleep(Duration::from_millis(100));
    let log = p.log();
    assert!(
        log.contains("upstream connect failed") && log.contains("Connection refused"),
        "log:\n{log}"
    );
}

#[test]
fn sigterm_refuses_new_connections_and_lets_transfers_finish() {
    // An upstream that streams 8 MiB slowly (about 1.6 s) to each client.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap();
    const TOTAL: usize = 8 << 20;
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let chunk = vec![0xa5u8; 256 * 1024];
                for _ in 0..TOTAL / chunk.len() {
                    if c.write_all(&chunk).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
    });
    let listen = free_port();
    let mut p = spawn(
        &[
            "relay",
            "--listen",
            &listen.to_string(),
            "--to",
            &up.to_string(),
            "--drain-timeout",
            "20",
        ],
        false,
    );
    p.wait_listening(listen);
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let mut c = TcpStream::connect(listen).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            std::thread::spawn(move || {
                let mut got = 0usize;
                let mut buf = vec![0u8; 65536];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) => return got,
                        Ok(n) => got += n,
                        Err(e) => panic!("transfer broken after {got} bytes: {e}"),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    p.signal(15);
    // New connections are refused once the listeners are closed. A SYN that
    // races the close (still in a closing listener's queue) is answered with a
    // reset instead: not served either, so it counts as refused.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match TcpStream::connect(listen) {
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
                ) =>
            {
                break
            }
            Err(e) => panic!("unexpected connect error {e}"),
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "still accepting 3 s after SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "zring exited before its transfers finished"
    );
    for r in readers {
        assert_eq!(r.join().unwrap(), TOTAL, "in-flight transfer completed");
    }
    let st = p.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "clean exit after drain: {st}");
}

#[test]
fn sigterm_closes_connections_still_open_at_the_deadline() {
    let up = echo();
    let listen = free_port();
    let mut p = spawn(
        &[
            "relay",
            "--listen",
            &listen.to_string(),
            "--to",
            &up.to_string(),
            "--drain-timeout",
            "0.5",
        ],
        false,
    );
    p.wait_listening(listen);
    let mut idle = TcpStream::connect(listen).unwrap();
    idle.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    idle.read_exact(&mut one).unwrap();
    let t = Instant::now();
    p.signal(15);
    let st = p.wait_exit(Duration::from_secs(10));
    assert!(st.success());
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "exited before the drain deadline"
    );
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 8];
    assert!(
        matches!(idle.read(&mut buf), Ok(0) | Err(_)),
        "connection closed at the deadline"
    );
    assert!(
        p.log().contains("drain deadline passed"),
        "log:\n{}",
        p.log()
    );
}

#[test]
fn repeated_listen_to_pairs_forward_each_port_to_its_own_upstream() {
    let up1 = echo();
    // The second upstream answers with a banner of its own, so a swapped pair shows.
    let banner = TcpListener::bind("127.0.0.1:0").unwrap();
    let up2 = banner.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in banner.incoming().flatten() {
            let _ = c.write_all(b"second upstream");
        }
    });
    let (l1, l2) = (free_port(), free_port());
    let mut p = spawn(
        &[
            "relay",
            "--listen",
            &l1.to_string(),
            "--to",
            &up1.to_string(),
            "--listen",
            &l2.to_string(),
            "--to",
            &up2.to_string(),
            "--workers",
            "1",
        ],
        false,
    );
    p.wait_listening(l1);
    p.wait_listening(l2);
    echo_roundtrip(l1);
    let mut c = TcpStream::connect(l2).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"second upstream", "log:\n{}", p.log());
    echo_roundtrip(l1);

    // Unpaired addresses are refused before anything listens, naming both counts.
    let mut bad = spawn(
        &[
            "relay",
            "--listen",
            &free_port().to_string(),
            "--listen",
            &free_port().to_string(),
            "--to",
            &up1.to_string(),
        ],
        false,
    );
    let st = bad.wait_exit(Duration::from_secs(10));
    assert!(!st.success());
    let log = bad.log();
    assert!(
        log.contains("come in pairs") && log.contains("got 2 --listen and 1 --to"),
        "log:\n{log}"
    );
}
