//! The latency harness end to end, as CI runs it: `zring-bench run --quick` builds the lab,
//! runs every scenario on the no-mesh, ambient and sidecar paths, and writes a report whose
//! numbers must be real (non-zero, no errors, traffic proven to cross the proxies); and an
//! interrupted run removes its namespaces and processes.
//!
//! Needs root (namespaces, veth, iptables) and HAProxy; CI runs as root and `scripts/test`
//! installs HAProxy. Elsewhere these tests print SKIPPED and return.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

/// The harness loads both CPUs: one run at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn skip(test: &str) -> bool {
    if !is_root() {
        eprintln!("SKIPPED {test}: the harness needs root for network namespaces, veth and iptables (CI runs as root)");
        return true;
    }
    false
}

fn bin_dir() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_zring-bench"));
    let dir = bench.parent().unwrap().to_path_buf();
    for b in ["zring", "zring-loadgen"] {
        assert!(
            dir.join(b).exists(),
            "{} missing: build the workspace (`cargo test --workspace --release` does)",
            dir.join(b).display()
        );
    }
    dir
}

fn harness(args: &[&str]) -> Command {
    let dir = bin_dir();
    let mut c = Command::new(env!("CARGO_BIN_EXE_zring-bench"));
    c.args(args)
        .arg("--zring")
        .arg(dir.join("zring"))
        .arg("--loadgen")
        .arg(dir.join("zring-loadgen"));
    c
}

/// `zring-bench run --quick --out <tmp>/zring-harness-TAG-<pid> EXTRA...` with stderr in a log
/// file: (report folder, log, child).
fn start(tag: &str, extra: &[&str]) -> (PathBuf, PathBuf, std::process::Child) {
    let out = std::env::temp_dir().join(format!("zring-harness-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let log = out.with_extension("log");
    let mut args = vec!["run", "--quick", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let child = harness(&args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (out, log, child)
}

fn namespaces_of(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("zrh{pid}-")))
        .map(String::from)
        .collect()
}

/// Processes whose command line mentions the harness run's scratch folders.
fn leftovers(pid: u32) -> Vec<String> {
    let tag = format!("zring-harness-{pid}-");
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&tag) {
                v.push(cmd);
            }
        }
    }
    v
}

fn wait_with_deadline(child: &mut std::process::Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("zring-bench did not finish within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn quick_run_measures_every_path_and_writes_the_report() {
    if skip("quick_run_measures_every_path_and_writes_the_report") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Istio's ztunnel runs as its own path when CI has it (ZTUNNEL_BIN), under the same agents,
    // istio-cni rules and YAML as zring.
    let ztunnel = std::env::var("ZTUNNEL_BIN").ok().filter(|p| !p.is_empty());
    let mut extra = vec![];
    match &ztunnel {
        Some(bin) => extra.extend(["--ztunnel", bin.as_str()]),
        None => eprintln!(
            "SKIPPED the ztunnel path of quick_run_measures_every_path_and_writes_the_report: ZTUNNEL_BIN is not set"
        ),
    }
    // Envoy as the waypoint (its own path) when ENVOY_BIN names an Envoy binary.
    let envoy = std::env::var("ENVOY_BIN")
        .ok()
        .filter(|p| !p.is_empty())
        .map(|p| format!("envoy:{p}"));
    match &envoy {
        Some(arg) => extra.extend(["--waypoint", arg.as_str()]),
        None => eprintln!(
            "SKIPPED the waypoint-envoy path of quick_run_measures_every_path_and_writes_the_report: ENVOY_BIN is not set"
        ),
    }
    let (out, log, mut child) = start("test", &extra);
    let pid = child.id();
    let st = wait_with_deadline(&mut child, 460);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(st.success(), "zring-bench run --quick failed:\n{text}");

    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let path = |name: &str| -> &serde_json::Value {
        results["paths"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in results"))
    };
    let mut measured = vec!["no-mesh", "relay", "ambient", "sidecar", "waypoint"];
    if ztunnel.is_some() {
        // ztunnel on both nodes, and zring against ztunnel both ways: interop under load; and
        // zring's waypoint between two ztunnels.
        measured.extend(["ztunnel", "mixed", "mixed-reverse", "waypoint-ztunnel"]);
    }
    if envoy.is_some() {
        measured.push("waypoint-envoy");
    }
    for name in measured.iter().copied() {
        let p = path(name);
        assert!(p["error"].is_null(), "{name}: {}", p["error"]);
        let runs = p["runs"].as_array().unwrap();
        for scenario in ["latency", "sweep", "max-rps", "throughput", "conns"] {
            let rs: Vec<&serde_json::Value> =
                runs.iter().filter(|r| r["scenario"] == scenario).collect();
            assert!(!rs.is_empty(), "{name}: no {scenario} run");
            for r in rs {
                let value = r["rate"].as_f64().unwrap() + r["gbit_s"].as_f64().unwrap();
                assert!(value > 0.0, "{name} {scenario}: nothing measured: {r}");
                assert_eq!(r["errors"], 0, "{name} {scenario}: errors: {r}");
                let raw = out.join(r["raw"].as_str().unwrap());
                assert!(raw.exists(), "{} missing", raw.display());
                if name != "no-mesh" {
                    let procs = r["proxies"].as_array().unwrap();
                    // Two node proxies, and the waypoint on the waypoint paths.
                    let want = if name.starts_with("waypoint") { 3 } else { 2 };
                    assert_eq!(procs.len(), want, "{name} {scenario}: proxies: {r}");
                    for q in procs {
                        assert!(q["rss_mib"].as_f64().unwrap() > 1.0, "{name}: RSS: {q}");
                    }
                }
            }
        }
        // The open-loop runs hold their rate.
        for r in runs.iter().filter(|r| r["scenario"] == "latency") {
            let rate = r["rate"].as_f64().unwrap();
            assert!(
                (900.0..1100.0).contains(&rate),
                "{name}: 1000 rps asked: {r}"
            );
        }
        // Proxies did the work under load: CPU is attributed to them at max rps.
        if name != "no-mesh" {
            let max = runs.iter().find(|r| r["scenario"] == "max-rps").unwrap();
            for q in max["proxies"].as_array().unwrap() {
                assert!(
                    q["millicores"].as_f64().unwrap() > 50.0,
                    "{name}: proxy idle at max rps: {q}"
                );
            }
            let idle = runs.iter().find(|r| r["scenario"] == "idle").unwrap();
            assert!(idle["note"].is_null(), "{name}: idle run skipped: {idle}");
            assert_eq!(idle["conns"], 200);
        }
    }
    let mut not_run: Vec<&str> = if ztunnel.is_some() {
        vec![]
    } else {
        vec!["ztunnel", "mixed", "mixed-reverse", "waypoint-ztunnel"]
    };
    if envoy.is_none() {
        not_run.push("waypoint-envoy");
    }
    for name in not_run.iter().copied() {
        assert!(
            path(name)["not_run"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{name} must be reported as not run, with the reason"
        );
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "| 16 | relay |",
        "| 16 | ambient |",
        "| 16 | sidecar |",
        "| 16 | waypoint |",
        if not_run.is_empty() {
            "| 16 | ambient |"
        } else {
            "**not run**"
        },
        if envoy.is_some() {
            "waypoint / waypoint-envoy"
        } else {
            "| 16 | waypoint |"
        },
        "![latency percentiles vs connections](latency.svg)",
        "| ambient | 200 |",
        "ambient / sidecar",
        if ztunnel.is_some() {
            "relay / ztunnel"
        } else {
            "ambient / sidecar"
        },
    ] {
        assert!(
            report.contains(needle),
            "report lacks {needle:?}:\n{report}"
        );
    }
    for svg in ["latency.svg", "cpu.svg", "memory.svg"] {
        let s = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.matches("<path ").count() >= 2, "{svg} has no lines");
    }
    assert!(namespaces_of(pid).is_empty(), "namespaces left behind");
    assert!(
        leftovers(pid).is_empty(),
        "processes left: {:?}",
        leftovers(pid)
    );
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn an_interrupted_run_removes_its_namespaces_and_processes() {
    if skip("an_interrupted_run_removes_its_namespaces_and_processes") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (out, log, mut child) = start("int", &["--paths", "no-mesh,ambient"]);
    let pid = child.id();
    // Interrupt while the ambient path is up and measuring (its proxies are running).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(" ambient latency") {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "harness ended early:\n{text}"
        );
        assert!(Instant::now() < deadline, "ambient never started:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(namespaces_of(pid).len(), 4, "the lab is up");
    assert!(!leftovers(pid).is_empty(), "the proxies are running");
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let st = wait_with_deadline(&mut child, 30);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(st.code(), Some(130), "exit code after SIGINT:\n{text}");
    assert!(text.contains("removing the lab"), "{text}");
    assert!(
        namespaces_of(pid).is_empty(),
        "namespaces left: {:?}",
        namespaces_of(pid)
    );
    // Killed processes are reaped by init; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !leftovers(pid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        leftovers(pid).is_empty(),
        "processes left: {:?}",
        leftovers(pid)
    );
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_file(&log);
}
