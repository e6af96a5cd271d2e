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

#[test]
fn max_rate_is_within_20_percent_of_wrk_on_the_same_server() {
    let _serial = serial();
    if Command::new("wrk").arg("--version").output().is_err() {
        panic!("wrk is not installed: scripts/test installs it (apt-get install wrk)");
    }
    let s = serve("http", &[]);
    let url = format!("http://{}/", s.addr);
    let wrk_once = || -> f64 {
        let wrk = Command::new("wrk")
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
        let out = run(&[
            "http",
            &url,
            "--rps",
            "max",
            "-c",
            "16",
            "-d",
            "3s",
            "-t",
            "1",
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(out.status.success());
        read_json(&json)["ActualQPS"].as_f64().unwrap()
    };
    // Interleaved, best of two each: a noisy moment on this 2-core machine hits one run, not a
    // whole side.
    let (w1, o1, w2, o2) = (wrk_once(), ours_once(), wrk_once(), ours_once());
    let (wrk_rps, ours) = (w1.max(w2), o1.max(o2));
    eprintln!("max rps at 16 connections: wrk {w1:.0}/{w2:.0}, zring-loadgen {o1:.0}/{o2:.0}; best {wrk_rps:.0} vs {ours:.0} (ratio {:.2})", ours / wrk_rps);
    assert!(
        ours >= 0.8 * wrk_rps && ours <= 1.2 * wrk_rps,
        "zring-loadgen {ours:.0} vs wrk {wrk_rps:.0}"
    );
}
