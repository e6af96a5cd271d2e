//! zring-loadgen against its own servers (and wrk) on loopback.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

const LOADGEN: &str = env!("CARGO_BIN_EXE_zring-loadgen");

/// These tests generate load and measure rates and latencies on a 2-core machine: running two at
/// once makes each the other's noise. Every test holds this lock while it runs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(kind: &str, extra: &[&str]) -> Server {
    let mut child = Command::new(LOADGEN)
        .args(["serve", kind, "--listen", "127.0.0.1:0", "--threads", "1"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read address");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("address line")
        .parse()
        .expect("address");
    Server { child, addr }
}

fn json_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("zring-loadgen-{tag}-{}.json", std::process::id()))
}

fn run(args: &[&str]) -> Output {
    let t = Instant::now();
    let out = Command::new(LOADGEN)
        .arg("run")
        .args(args)
        .output()
        .expect("run loadgen");
    eprintln!(
        "zring-loadgen run {args:?} took {:?}\n{}{}",
        t.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read_json(path: &PathBuf) -> serde_json::Value {
    let v = serde_json::from_str(&std::fs::read_to_string(path).expect("json written"))
        .expect("valid json");
    let _ = std::fs::remove_file(path);
    v
}

fn percentile(v: &serde_json::Value, p: f64) -> f64 {
    v["DurationHistogram"]["Percentiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| (x["Percentile"].as_f64().unwrap() - p).abs() < 1e-9)
        .unwrap()["Value"]
        .as_f64()
        .unwrap()
}

#[test]
fn open_loop_hits_the_asked_rate_and_counts_every_request() {
    let _serial = serial();
    let s = serve("http", &[]);
    let json = json_path("rate");
    let url = format!("http://{}/?size=1024", s.addr);
    let out = run(&[
        "http",
        &url,
        "--rps",
        "1000",
        "-c",
        "8",
        "-d",
        "5s",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let v = read_json(&json);
    let qps = v["ActualQPS"].as_f64().unwrap();
    assert!(
        (qps - 1000.0).abs() <= 20.0,
        "achieved {qps} rps, asked 1000"
    );
    let count = v["DurationHistogram"]["Count"].as_u64().unwrap();
    assert_eq!(
        v["RetCodes"]["200"].as_u64().unwrap(),
        count,
        "histogram count equals completed requests"
    );
    assert!((4900..=5100).contains(&count), "count {count}");
    // fortio's field names are present for tools that read fortio results.
    for field in [
        "Labels",
        "StartTime",
        "RequestedQPS",
        "ActualQPS",
        "ActualDuration",
        "NumThreads",
        "DurationHistogram",
        "RetCodes",
    ] {
        assert!(v.get(field).is_some(), "missing {field}");
    }
    assert_eq!(v["RequestedQPS"], "1000");
    assert!(v["HdrHistogram"].is_string());
}

#[test]
fn slow_server_latency_is_at_least_its_delay() {
    let _serial = serial();
    let s = serve("http", &["--delay", "50ms"]);
    let json = json_path("slow");
    let url = format!("http://{}/", s.addr);
    let out = run(&[
        "http",
        &url,
        "--rps",
        "100",
        "-c",
        "10",
        "-d",
        "2s",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let v = read_json(&json);
    assert!(
        percentile(&v, 50.0) >= 0.050,
        "p50 {} < 50 ms",
        percentile(&v, 50.0)
    );
}

#[test]
fn our_own_timer_lateness_is_not_counted_as_target_latency() {
    // One connection at 1000 rps: the interval (1 ms) is the timer's granularity, so every
    // send is a little late. A fast server must still show its own latency (tens of
    // microseconds), not a chain of our timer's lateness (the bug this guards: p50 ~1.4 ms).
    let _serial = serial();
    let s = serve("http", &[]);
    let json = json_path("timer");
    let url = format!("http://{}/", s.addr);
    let out = run(&[
        "http",
        &url,
        "--rps",
        "1000",
        "-c",
        "1",
        "-d",
        "2s",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let v = read_json(&json);
    let p50 = percentile(&v, 50.0);
    assert!(
        p50 < 0.0005,
        "p50 {p50} s: our timer's lateness was counted"
    );
}

/// An HTTP server on a plain thread that answers at once, except that it stops answering for
/// 500 ms once, 1 s into the run.
fn stalling_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let first = Arc::new(std::sync::Mutex::new(None::<Instant>));
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let first = first.clone();
            std::thread::spawn(move || {
                let mut c = c;
                c.set_nodelay(true).unwrap();
                let mut buf = [0u8; 4096];
                let mut pending = Vec::new();
                loop {
                    let n = match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        let t0 = *first.lock().unwrap().get_or_insert_with(Instant::now);
                        let since = t0.elapsed();
                        let stall_at = Duration::from_secs(1);
                        if since >= stall_at && since < stall_at + Duration::from_millis(500) {
                            std::thread::sleep(stall_at + Duration::from_millis(500) - since);
                        }
                        if c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_stall_shows_in_p99_when_latency_is_measured_from_intended_send_time() {
    let _serial = serial();
    let addr = stalling_server();
    let json = json_path("stall");
    let url = format!("http://{addr}/");
    let out = run(&[
        "http",
        &url,
        "--rps",
        "1000",
        "-c",
        "4",
        "-d",
        "3s",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let v = read_json(&json);
    let count = v["DurationHistogram"]["Count"].as_u64().unwrap() as f64;
    // Share of requests recorded at >= 100 ms, from the histogram's buckets.
    let slow: u64 = v["DurationHistogram"]["Data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["Start"].as_f64().unwrap() >= 0.1)
        .map(|b| b["Count"].as_u64().unwrap())
        .sum();
    let share = slow as f64 / count;
    eprintln!(
        "requests >= 100 ms: {slow} of {count} ({:.1}%), p99 {:.3}s",
        share * 100.0,
        percentile(&v, 99.0)
    );
    assert!(
        share >= 0.10,
        "the 500 ms stall is hidden: only {:.1}% of requests >= 100 ms",
        share * 100.0
    );
    assert!(
        percentile(&v, 99.0) >= 0.3,
        "p99 {} does not show the stall",
        percentile(&v, 99.0)
    );
}

#[test]
fn tcp_rr_checks_every_echoed_byte() {
    let _serial = serial();
    let s = serve("echo", &[]);
    let json = json_path("rr");
    let out = run(&[
        "tcp-rr",
        &s.addr.to_string(),
        "--req-size",
        "1000",
        "--rps",
        "2000",
        "-c",
        "4",
        "-d",
        "2s",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let v = read_json(&json);
    assert!(v["DurationHistogram"]["Count"].as_u64().unwrap() >= 3900);
    assert!(v["Errors"].as_object().unwrap().is_empty());

    // A server that corrupts one byte per answer is caught as bad responses.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf = [0u8; 1000];
                while c.read_exact(&mut buf).is_ok() {
                    buf[500] ^= 1;
                    if c.write_all(&buf).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let json = json_path("rr-bad");
    let out = run(&[
        "tcp-rr",
        &addr.to_string(),
        "--req-size",
        "1000",
        "--rps",
        "200",
        "-c",
        "2",
        "-d",
        "1s",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "corrupted echoes must fail the run");
    let v = read_json(&json);
    assert!(v["Errors"]["bad_response"].as_u64().unwrap() > 0);
}

#[test]
fn tcp_crr_opens_a_connection_per_request() {
    let _serial = serial();
    let s = serve("echo", &[]);
    let json = json_path("crr");
    let out = run(&[
        "tcp-crr",
        &s.addr.to_string(),
        "--req-size",
        "64",
        "--rps",
        "500",
        "-c",
        "4",
        "-d",
        "2s",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let v = read_json(&json);
    let count = v["DurationHistogram"]["Count"].as_u64().unwrap();
    assert!(count >= 950, "count {count}");
    assert!(
        v["SocketCount"].as_u64().unwrap() >= count,
        "one socket per request"
    );
}

#[test]
fn tcp_stream_reports_throughput() {
    let _serial = serial();
    let s = serve("sink", &[]);
    let out = run(&["tcp-stream", &s.addr.to_string(), "-c", "2", "-d", "1s"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let gbit: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("throughput: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .expect("throughput line");
    assert!(gbit > 0.1, "{gbit} Gbit/s");
}

#[test]
fn nothing_listening_counts_errors_exits_nonzero_and_does_not_hang() {
    let _serial = serial();
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let json = json_path("dead");
    let t = Instant::now();
    let out = run(&[
        "http",
        &format!("http://{dead}/"),
        "--rps",
        "100",
        "-c",
        "2",
        "-d",
        "1s",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("refused"));
    let v = read_json(&json);
    assert!(v["Errors"]["refused"].as_u64().unwrap() >= 90);
    // --allow-errors turns the exit code to 0 but still reports.
    let out = run(&[
        "http",
        &format!("http://{dead}/"),
        "--rps",
        "50",
        "-c",
        "1",
        "-d",
        "500ms",
        "--allow-errors",
    ]);
    assert!(out.status.success());
}

/// Pin a command to CPU `cpu` with taskset when the machine has more than one CPU, so that the
/// server and the client under comparison each own a core instead of fighting the scheduler.
fn pinned(cpu: usize, program: &str) -> Command {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus > 1 && Command::new("taskset").arg("-V").output().is_ok() {
        let mut c = Command::new("taskset");
        c.args(["-c", &cpu.to_string(), program]);
        c
    } else {
        Command::new(program)
    }
}

/// The server's own count of the requests it answered (`GET /__zring-loadgen/stats`).
fn served(addr: SocketAddr) -> u64 {
    let mut c = std::net::TcpStream::connect(addr).expect("connect for stats");
    c.write_all(b"GET /__zring-loadgen/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let body = text.split("\r\n\r\n").nth(1).expect("stats body");
    let v: serde_json::Value = serde_json::from_str(body).expect("stats json");
    v["requests"].as_u64().expect("requests")
}

#[test]
fn max_rate_is_at_least_wrks_within_20_percent_and_the_server_confirms_the_count() {
    let _serial = serial();
    if Command::new("wrk").arg("--version").output().is_err() {
        panic!("wrk is not installed: scripts/test installs it (apt-get install wrk)");
    }
    // Server on CPU 0, each client in turn on CPU 1, one thread each.
    let mut child = pinned(0, LOADGEN)
        .args(["serve", "http", "--listen", "127.0.0.1:0", "--threads", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read address");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("address line {line:?}"));
    let s = Server { child, addr };
    let url = format!("http://{}/", s.addr);
    let wrk_once = || -> f64 {
        let wrk = pinned(1, "wrk")
            .args(["-t1", "-c16", "-d3s", &url])
            .output()
            .expect("run wrk");
        let text = String::from_utf8_lossy(&wrk.stdout).to_string();
        text.lines()
            .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
            .and_then(|x| x.trim().parse().ok())
            .unwrap_or_else(|| panic!("wrk output:\n{text}"))
    };
    let ours_once = || -> f64 {
        let json = json_path("max");
        let before = served(s.addr);
        let out = pinned(1, LOADGEN)
            .args([
                "run", "http", &url, "--rps", "max", "-c", "16", "-d", "3s", "-t", "1",
            ])
            .args(["--json", json.to_str().unwrap()])
            .output()
            .expect("run zring-loadgen");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = served(s.addr);
        let v = read_json(&json);
        // The server's own count proves the figure: every request counted was answered, and at
        // most one request per connection was in flight when the run stopped (answered by
        // the server, not counted by a client that had stopped measuring). Warmup is off.
        let completed = v["DurationHistogram"]["Count"].as_u64().unwrap();
        let answered = after - before;
        assert!(
            answered >= completed && answered <= completed + 16,
            "server answered {answered}, zring-loadgen counted {completed}"
        );
        v["ActualQPS"].as_f64().unwrap()
    };
    // Three interleaved rounds, best of each side: a noisy moment on a small shared machine
    // hits one run, not a whole side.
    let mut w = Vec::new();
    let mut o = Vec::new();
    for _ in 0..3 {
        w.push(wrk_once());
        o.push(ours_once());
    }
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let (wrk_rps, ours) = (best(&w), best(&o));
    eprintln!(
        "max rps at 16 connections: wrk {w:.0?}, zring-loadgen {o:.0?}; best {wrk_rps:.0} vs {ours:.0} (ratio {:.2})",
        ours / wrk_rps
    );
    // The lower bound is the criterion: zring-loadgen must be able to load a server at least as
    // hard as wrk, within 20%. Above wrk by more than 20% is not failed: the first CI run saw
    // 1.41x (wrk -t1 is the slower client on this server), and every zring-loadgen figure above
    // is already confirmed by the server's own count, so a higher rate is real, not miscounted.
    assert!(
        ours >= 0.8 * wrk_rps,
        "zring-loadgen {ours:.0} is more than 20% below wrk {wrk_rps:.0}"
    );
    if ours > 1.2 * wrk_rps {
        eprintln!(
            "note: zring-loadgen out-ran wrk by more than 20%; the server's count confirms it"
        );
    }
}
