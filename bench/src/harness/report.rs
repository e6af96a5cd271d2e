//! `report.md` and its SVG charts from `results.json`, and the index in `perf-reports/README.md`.

use std::{fmt::Write, path::Path};

use super::{
    svg::{color, line_chart, Series},
    PathResult, ProxyUse, Results, RunResult,
};

/// Chooses one run of a scenario.
type Pick = Box<dyn Fn(&RunResult) -> bool>;

const INDEX_START: &str = "<!-- harness:start -->";
const INDEX_END: &str = "<!-- harness:end -->";

fn ran(r: &Results) -> impl Iterator<Item = &PathResult> {
    r.paths
        .iter()
        .filter(|p| p.not_run.is_none() && !p.runs.is_empty())
}

fn find<'a>(
    p: &'a PathResult,
    scenario: &str,
    pick: impl Fn(&RunResult) -> bool,
) -> Option<&'a RunResult> {
    p.runs.iter().find(|r| r.scenario == scenario && pick(r))
}

fn latency_at(p: &PathResult, conns: usize) -> Option<&RunResult> {
    find(p, "latency", |r| r.conns == conns)
}

fn total_millicores(r: &RunResult) -> f64 {
    r.proxies.iter().map(|p| p.millicores).sum()
}

/// The busiest proxy process's CPU: on the waypoint path the waypoint, else a node proxy (or
/// sidecar) — the figure a per-process budget such as "under 50 millicores per 1000 rps" is
/// about.
fn busiest_millicores(r: &RunResult) -> Option<f64> {
    r.proxies.iter().map(|q| q.millicores).reduce(f64::max)
}

/// Each proxy process of a run as "label: CPU m, RSS" (or "-" without proxies).
fn proxy_use(x: &RunResult) -> String {
    let px: Vec<String> = x
        .proxies
        .iter()
        .map(|q| match q.user_millicores {
            Some(u) => format!(
                "{}: {:.0}m ({:.0} user), {:.1}",
                q.label, q.millicores, u, q.rss_mib
            ),
            None => format!("{}: {:.0}m, {:.1}", q.label, q.millicores, q.rss_mib),
        })
        .collect();
    if px.is_empty() {
        "-".into()
    } else {
        px.join("; ")
    }
}

fn total_rss(r: &RunResult) -> f64 {
    r.proxies.iter().map(|p| p.rss_mib).sum()
}

/// MiB of proxy memory (all the path's proxies) per 1000 idle connections, from the largest
/// idle run.
fn mib_per_1000_idle(p: &PathResult) -> Option<(usize, f64)> {
    let r = p
        .runs
        .iter()
        .filter(|r| r.scenario == "idle" && r.note.is_none())
        .max_by_key(|r| r.conns)?;
    let grown: f64 = r
        .proxies
        .iter()
        .map(|x| x.rss_mib - x.rss_before_mib.unwrap_or(x.rss_mib))
        .sum();
    Some((r.conns, grown * 1000.0 / r.conns.max(1) as f64))
}

/// How many rounds the path was measured in (`--repeat`).
fn round_count(p: &PathResult) -> usize {
    p.runs.iter().map(|r| r.rep + 1).max().unwrap_or(1)
}

/// The path as measured in one round.
fn round(p: &PathResult, k: usize) -> PathResult {
    PathResult {
        runs: p.runs.iter().filter(|r| r.rep == k).cloned().collect(),
        ..p.clone()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn median_opt(v: Vec<Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.into_iter().flatten().collect();
    (!v.is_empty()).then(|| median(v))
}

/// One run per measurement: with several rounds, each figure is the median of the rounds'
/// (errors: the most any round had).
fn median_run(runs: &[&RunResult]) -> RunResult {
    let first = runs[0];
    let m = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(|r| f(r)).collect());
    let proxies = (0..first.proxies.len())
        .map(|j| {
            let at: Vec<&ProxyUse> = runs.iter().filter_map(|r| r.proxies.get(j)).collect();
            let mo = |f: &dyn Fn(&ProxyUse) -> Option<f64>| {
                median_opt(at.iter().map(|q| f(q)).collect())
            };
            ProxyUse {
                label: first.proxies[j].label.clone(),
                millicores: median(at.iter().map(|q| q.millicores).collect()),
                user_millicores: mo(&|q| q.user_millicores),
                rss_mib: median(at.iter().map(|q| q.rss_mib).collect()),
                rss_before_mib: mo(&|q| q.rss_before_mib),
                rss_closed_mib: mo(&|q| q.rss_closed_mib),
                closed_after_s: mo(&|q| q.closed_after_s),
            }
        })
        .collect();
    RunResult {
        rate: m(&|r| r.rate),
        p50_ms: m(&|r| r.p50_ms),
        p90_ms: m(&|r| r.p90_ms),
        p99_ms: m(&|r| r.p99_ms),
        p999_ms: m(&|r| r.p999_ms),
        max_ms: m(&|r| r.max_ms),
        gbit_s: m(&|r| r.gbit_s),
        errors: runs.iter().map(|r| r.errors).max().unwrap_or(0),
        system_busy: m(&|r| r.system_busy),
        proxies,
        ..first.clone()
    }
}

/// The results with each path's rounds folded into medians (the tables and charts show these;
/// the headline also shows the spread).
fn median_view(r: &Results) -> Results {
    let mut out = r.clone();
    for p in &mut out.paths {
        if round_count(p) < 2 {
            continue;
        }
        let first = round(p, 0);
        p.runs = first
            .runs
            .iter()
            .map(|x| {
                let same: Vec<&RunResult> = r
                    .paths
                    .iter()
                    .find(|q| q.name == p.name)
                    .map(|q| {
                        q.runs
                            .iter()
                            .filter(|y| {
                                y.scenario == x.scenario
                                    && y.conns == x.conns
                                    && y.target_rps == x.target_rps
                                    && y.streams == x.streams
                                    && y.note.is_none() == x.note.is_none()
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if x.note.is_some() || same.is_empty() {
                    x.clone()
                } else {
                    median_run(&same)
                }
            })
            .collect();
    }
    out
}

/// A headline figure over the rounds: median, lowest, highest, and how many rounds.
#[derive(Debug, Clone, Copy)]
struct Stat {
    med: f64,
    min: f64,
    max: f64,
    n: usize,
}

impl Stat {
    fn of(v: Vec<f64>) -> Option<Stat> {
        if v.is_empty() {
            return None;
        }
        let (min, max) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        Some(Stat {
            n: v.len(),
            med: median(v),
            min,
            max,
        })
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// The ratio of medians and, with several rounds, whether the whole spread is on one side:
/// "lead" when every round of `a` beats every round of `b`, "behind" the other way round,
/// "overlap" when the spreads meet (not a lead, whatever the medians say).
fn ratio_judged(a: Option<Stat>, b: Option<Stat>, higher_better: bool) -> String {
    let (Some(a), Some(b)) = (a, b) else {
        return "-".into();
    };
    let r = ratio(Some(a.med), Some(b.med));
    if a.n < 2 || b.n < 2 {
        return r;
    }
    let (better, worse) = if higher_better {
        (a.min > b.max, a.max < b.min)
    } else {
        (a.max < b.min, a.min > b.max)
    };
    let verdict = match (better, worse) {
        (true, _) => "lead",
        (_, true) => "behind",
        _ => "overlap",
    };
    format!("{r} {verdict}")
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The headline rows: (metric, figure per path over its rounds, higher is better).
fn headline(r: &Results, conns: usize) -> Vec<(String, Vec<Option<Stat>>, bool)> {
    let paths: Vec<&PathResult> = ran(r).collect();
    let col = |f: &dyn Fn(&PathResult) -> Option<f64>| {
        paths
            .iter()
            .map(|p| {
                Stat::of(
                    (0..round_count(p))
                        .filter_map(|k| f(&round(p, k)))
                        .collect(),
                )
            })
            .collect()
    };
    vec![
        (
            format!("p50 ms, HTTP 1000 rps, {conns} conns"),
            col(&|p| latency_at(p, conns).map(|x| x.p50_ms)),
            false,
        ),
        (
            format!("p99 ms, HTTP 1000 rps, {conns} conns"),
            col(&|p| latency_at(p, conns).map(|x| x.p99_ms)),
            false,
        ),
        (
            "max HTTP rps, 16 conns".into(),
            col(&|p| find(p, "max-rps", |_| true).map(|x| x.rate)),
            true,
        ),
        (
            "new connections/s (tcp-crr, 16)".into(),
            col(&|p| find(p, "conns", |_| true).map(|x| x.rate)),
            true,
        ),
        (
            "Gbit/s, iperf3 1 stream".into(),
            col(&|p| find(p, "throughput", |x| x.streams == 1).map(|x| x.gbit_s)),
            true,
        ),
        (
            "Gbit/s, iperf3 8 streams".into(),
            col(&|p| find(p, "throughput", |x| x.streams == 8).map(|x| x.gbit_s)),
            true,
        ),
        (
            "proxy CPU millicores at 1000 rps (all proxies)".into(),
            col(&|p| {
                find(p, "sweep", |x| x.target_rps == Some(1000))
                    .filter(|x| !x.proxies.is_empty())
                    .map(total_millicores)
            }),
            false,
        ),
        (
            format!("busiest proxy process, CPU millicores at 1000 rps, {conns} conns"),
            col(&|p| latency_at(p, conns).and_then(busiest_millicores)),
            false,
        ),
        (
            "proxy MiB per 1000 idle connections (all proxies, largest idle run)".into(),
            col(&|p| mib_per_1000_idle(p).map(|(_, m)| m)),
            false,
        ),
    ]
}

fn headline_table(r: &Results) -> String {
    let paths: Vec<&PathResult> = ran(r).collect();
    let conns = if r
        .plan
        .as_ref()
        .is_some_and(|p| p.latency_conns.contains(&16))
    {
        16
    } else {
        1
    };
    let mut s = String::new();
    let names: Vec<&str> = paths.iter().map(|p| p.name.as_str()).collect();
    // zring's ambient path against each baseline that ran (Istio's ztunnel, the sidecars),
    // the relay floor against ztunnel: how much of ztunnel's cost any relay pays, and zring's
    // waypoint against Envoy's.
    let at = |n: &str| names.iter().position(|x| *x == n);
    let pairs: Vec<(usize, usize, String)> = [
        ("ambient", "ztunnel"),
        ("ambient", "sidecar"),
        ("relay", "ztunnel"),
        ("waypoint", "waypoint-envoy"),
    ]
    .into_iter()
    .filter_map(|(a, b)| Some((at(a)?, at(b)?, format!("{a} / {b}"))))
    .collect();
    let _ = write!(s, "| metric | {} |", names.join(" | "));
    for (_, _, label) in &pairs {
        let _ = write!(s, " {label} |");
    }
    s.push('\n');
    let _ = write!(
        s,
        "|---|{}{}",
        "---|".repeat(names.len()),
        "---|".repeat(pairs.len())
    );
    s.push('\n');
    let rounds = paths.iter().map(|p| round_count(p)).max().unwrap_or(1);
    for (metric, vals, higher_better) in headline(r, conns) {
        let digits = if metric.contains(" ms,") {
            3
        } else if metric.starts_with("Gbit") || metric.contains("MiB") {
            2
        } else {
            0
        };
        let shown = |v: &Option<Stat>| match v {
            Some(st) if st.n > 1 => format!(
                "{} ({}-{})",
                opt(Some(st.med), digits),
                opt(Some(st.min), digits),
                opt(Some(st.max), digits)
            ),
            _ => opt(v.map(|st| st.med), digits),
        };
        let _ = write!(
            s,
            "| {metric} | {} |",
            vals.iter().map(shown).collect::<Vec<_>>().join(" | ")
        );
        for (a, b, _) in &pairs {
            let _ = write!(s, " {} |", ratio_judged(vals[*a], vals[*b], higher_better));
        }
        s.push('\n');
    }
    if !pairs.is_empty() {
        let names: Vec<&str> = pairs.iter().map(|(_, _, l)| l.as_str()).collect();
        let _ = writeln!(
            s,
            "\n{}: below 1 is better for latency, CPU and memory; above 1 is better for rates and throughput.",
            names.join(", ")
        );
        if rounds > 1 {
            let _ = writeln!(
                s,
                "\nEach figure is the median of {rounds} rounds (paths interleaved, a fresh lab each), with the lowest and highest in brackets; a ratio is marked **lead** only when every round of the first path beats every round of the second, **behind** when every round loses, and **overlap** otherwise."
            );
        }
    }
    s
}

pub fn write(dir: &Path, raw: &Results) -> anyhow::Result<()> {
    // Tables and charts show each figure's median over the rounds; the headline its spread.
    let med = median_view(raw);
    let r = &med;
    let mut md = String::new();
    let m = &r.machine;
    let title_paths: Vec<&str> = ran(r).map(|p| p.name.as_str()).collect();
    let _ = writeln!(
        md,
        "# Latency harness: {}\n",
        if title_paths.is_empty() {
            "profiles".to_string()
        } else {
            title_paths.join(" vs ")
        }
    );
    if r.quick {
        md.push_str("**Quick mode** (a few seconds per path, for CI): this checks the harness end to end; its numbers are not a report.\n\n");
    }
    let _ = writeln!(
        md,
        "- Command: `{}` (release build, as root)\n- Commit: `{}`, date {}\n- Machine: {} CPUs, {}, kernel {}, {} GiB RAM. Client, server and every proxy share these CPUs: compare paths within this report (ratios), not absolute numbers across machines.",
        r.command,
        r.commit,
        r.date,
        m["nproc"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["mem_gib"],
    );
    if let Some(p) = &r.plan {
        let _ = writeln!(
            md,
            "- Load: zring-loadgen (open loop, coordinated-omission corrected latency) from the client pod; HTTP/1.1 GET with 1 KiB responses; {} s per latency/max-rps/throughput/connection-rate run and {} s per rps-sweep step, each after a {} s warm-up; iperf3 for throughput.",
            p.secs, p.sweep_secs, p.warmup_secs
        );
    }
    md.push_str("- Topology (network namespaces the harness creates and removes): client pod 10.241.1.2 - veth - node-1 - veth - node-2 - veth - server pod 10.241.2.2. Every path runs on a fresh copy of it.\n\n");

    md.push_str("## Paths\n\n| path | what | status | io backend |\n|---|---|---|---|\n");
    for p in &r.paths {
        let status = if let Some(w) = &p.not_run {
            format!("**not run**: {w}")
        } else if let Some(e) = &p.error {
            format!("**failed**: {}", e.replace('\n', " "))
        } else {
            format!("run ({} measurements)", p.runs.len())
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            p.name, p.description, status, p.io_backend
        );
    }
    md.push_str("\nThe sidecar path stands in for Istio's Envoy sidecars with HAProxy (Debian's): HTTP mode for HTTP, TCP mode for echo and iperf3, mutual TLS with the same CA, certificate chain verified, TLS 1.2 between the sidecars (Debian 12's HAProxy links OpenSSL 3.0, with which TLS 1.3 resumptions, still doing an ECDHE exchange, gave 1.2-1.3x fewer new connections per second here; sessions are resumed either way), one thread per CPU; it does not check the peer's SPIFFE identity against a policy (the ambient path does, with an L4 allow policy on the server). zring's access logs are off in the harness, like HAProxy's.\n\n");

    md.push_str("## Headline\n\n");
    // Human reading of the numbers, kept across re-renders.
    let notes = std::fs::read_to_string(dir.join("notes.md")).unwrap_or_default();
    md.push_str(&headline_table(raw));
    md.push('\n');
    if !notes.trim().is_empty() {
        md.push_str("## Reading this report\n\n");
        md.push_str(notes.trim());
        md.push_str("\n\n");
    }

    // Latency sweep.
    let paths: Vec<&PathResult> = ran(r).collect();
    let base = paths.iter().find(|p| p.name == "no-mesh").copied();
    if let Some(plan) = &r.plan {
        let _ = writeln!(
            md,
            "## Latency: HTTP at {} rps, by connections\n\nmilliseconds; delta = this path minus no-mesh at the same connection count. Proxies: each proxy process's CPU in millicores over the run (at 1000 rps, millicores are microseconds of CPU per request) and its RSS at the end.\n\n| conns | path | achieved rps | p50 | p90 | p99 | p99.9 | max | delta p50 | delta p99 | errors | proxies: CPU millicores, RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|",
            plan.latency_rps
        );
        for &c in &plan.latency_conns {
            for p in &paths {
                let Some(x) = latency_at(p, c) else { continue };
                let b = base.and_then(|b| latency_at(b, c));
                let _ = writeln!(
                    md,
                    "| {c} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} |",
                    p.name,
                    x.rate,
                    x.p50_ms,
                    x.p90_ms,
                    x.p99_ms,
                    x.p999_ms,
                    x.max_ms,
                    b.map_or("-".into(), |b| format!("{:+.3}", x.p50_ms - b.p50_ms)),
                    b.map_or("-".into(), |b| format!("{:+.3}", x.p99_ms - b.p99_ms)),
                    x.errors,
                    proxy_use(x)
                );
            }
        }
        let xs: Vec<String> = plan.latency_conns.iter().map(|c| c.to_string()).collect();
        let mut series = Vec::new();
        for p in &paths {
            for (pct, dashed) in [("p50", false), ("p99", true)] {
                series.push(Series {
                    name: format!("{} {pct}", p.name),
                    values: plan
                        .latency_conns
                        .iter()
                        .map(|&c| {
                            latency_at(p, c).map(|x| if dashed { x.p99_ms } else { x.p50_ms })
                        })
                        .collect(),
                    color: color(&p.name),
                    dashed,
                });
            }
        }
        std::fs::write(
            dir.join("latency.svg"),
            line_chart(
                &format!(
                    "HTTP latency at {} rps (p50 solid, p99 dashed)",
                    plan.latency_rps
                ),
                "connections",
                "milliseconds",
                &xs,
                &series,
            ),
        )?;
        md.push_str("\n![latency percentiles vs connections](latency.svg)\n\n");

        // RPS sweep.
        let _ = writeln!(
            md,
            "## Rate sweep at {} connections: latency, CPU and memory per proxy\n\nCPU in millicores (1000 = one core busy) of each proxy process over the run; RSS at its end.\n\n| target rps | path | achieved | p50 ms | p99 ms | errors | proxies: CPU millicores, RSS MiB | machine busy |\n|---|---|---|---|---|---|---|---|",
            plan.sweep_conns
        );
        for &rps in &plan.sweep_rps {
            for p in &paths {
                let Some(x) = find(p, "sweep", |x| x.target_rps == Some(rps)) else {
                    continue;
                };
                let _ = writeln!(
                    md,
                    "| {rps} | {} | {:.0} | {:.3} | {:.3} | {} | {} | {:.0}% |",
                    p.name,
                    x.rate,
                    x.p50_ms,
                    x.p99_ms,
                    x.errors,
                    proxy_use(x),
                    x.system_busy * 100.0
                );
            }
        }
        let xs: Vec<String> = plan.sweep_rps.iter().map(|c| c.to_string()).collect();
        let meshed: Vec<&&PathResult> = paths.iter().filter(|p| !p.proxies.is_empty()).collect();
        let sweep_series = |f: &dyn Fn(&RunResult) -> f64| -> Vec<Series> {
            meshed
                .iter()
                .map(|p| Series {
                    name: p.name.clone(),
                    values: plan
                        .sweep_rps
                        .iter()
                        .map(|&rps| find(p, "sweep", |x| x.target_rps == Some(rps)).map(f))
                        .collect(),
                    color: color(&p.name),
                    dashed: false,
                })
                .collect()
        };
        std::fs::write(
            dir.join("cpu.svg"),
            line_chart(
                &format!(
                    "Proxy CPU vs rate ({} connections, all proxies of the path)",
                    plan.sweep_conns
                ),
                "requests per second",
                "millicores",
                &xs,
                &sweep_series(&total_millicores),
            ),
        )?;
        std::fs::write(
            dir.join("memory.svg"),
            line_chart(
                &format!(
                    "Proxy RSS vs rate ({} connections, all proxies of the path)",
                    plan.sweep_conns
                ),
                "requests per second",
                "MiB",
                &xs,
                &sweep_series(&total_rss),
            ),
        )?;
        md.push_str("\n![proxy CPU vs rps](cpu.svg)\n\n![proxy memory vs rps](memory.svg)\n\n");
    }

    // Capacity.
    md.push_str("## Capacity\n\nRatios against no-mesh measured in this run.\n\n| test | path | result | x no-mesh | proxies: CPU millicores | machine busy | errors |\n|---|---|---|---|---|---|---|\n");
    let capacity: [(&str, &str, Pick); 4] = [
        ("max HTTP rps, 16 conns", "max-rps", Box::new(|_| true)),
        ("new connections/s, 16 conns", "conns", Box::new(|_| true)),
        (
            "iperf3, 1 stream",
            "throughput",
            Box::new(|x| x.streams == 1),
        ),
        (
            "iperf3, 8 streams",
            "throughput",
            Box::new(|x| x.streams == 8),
        ),
    ];
    for (label, scenario, pick) in &capacity {
        let value = |x: &RunResult| {
            if *scenario == "throughput" {
                x.gbit_s
            } else {
                x.rate
            }
        };
        let b = base.and_then(|b| find(b, scenario, pick)).map(value);
        for p in &paths {
            let Some(x) = find(p, scenario, pick) else {
                continue;
            };
            let px: Vec<String> = x
                .proxies
                .iter()
                .map(|q| format!("{} {:.0}", q.label, q.millicores))
                .collect();
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} | {:.0}% | {} |",
                p.name,
                if *scenario == "throughput" {
                    format!("{:.2} Gbit/s", x.gbit_s)
                } else {
                    format!("{:.0}/s (p99 {:.3} ms)", x.rate, x.p99_ms)
                },
                ratio(Some(value(x)), b),
                if px.is_empty() {
                    "-".into()
                } else {
                    px.join(", ")
                },
                x.system_busy * 100.0,
                x.errors
            );
        }
    }

    // Idle memory.
    md.push_str("\n## Memory with idle tunneled connections\n\nThe client pod opens N connections to the echo app through the path, proves each with a one-byte echo, and holds them; RSS of each proxy before and after (2 s later). A sample of the connections echoes again after the measurement. Then they close: RSS is read every second until every proxy is back within 10% of its level before, or the wait ends (30 s; 3 s with --quick).\n\n| path | connections | proxy: RSS before -> after (MiB) | KiB per connection (all proxies) | after the close: RSS (MiB), seconds |\n|---|---|---|---|---|\n");
    for p in &paths {
        for x in p.runs.iter().filter(|x| x.scenario == "idle") {
            if let Some(note) = &x.note {
                let _ = writeln!(md, "| {} | {} | {note} | - | - |", p.name, x.conns);
                continue;
            }
            let grown: f64 = x
                .proxies
                .iter()
                .map(|q| q.rss_mib - q.rss_before_mib.unwrap_or(q.rss_mib))
                .sum();
            let px: Vec<String> = x
                .proxies
                .iter()
                .map(|q| {
                    format!(
                        "{}: {:.1} -> {:.1}",
                        q.label,
                        q.rss_before_mib.unwrap_or(0.0),
                        q.rss_mib
                    )
                })
                .collect();
            let closed: Vec<String> = x
                .proxies
                .iter()
                .filter_map(|q| {
                    let (c, b) = (q.rss_closed_mib?, q.rss_before_mib?);
                    let back = if c <= b * 1.10 { "back" } else { "NOT back" };
                    Some(format!("{}: {c:.1} ({back})", q.label))
                })
                .collect();
            let closed = match x.proxies.first().and_then(|q| q.closed_after_s) {
                Some(t) if !closed.is_empty() => format!("{} after {t:.0} s", closed.join("; ")),
                _ => "-".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.1} | {closed} |",
                p.name,
                x.conns,
                px.join("; "),
                grown * 1024.0 / x.conns.max(1) as f64
            );
        }
    }

    // Flamegraphs.
    if !r.profiles.is_empty() {
        md.push_str("\n## Flamegraphs\n\n`perf record -e cpu-clock -g --call-graph dwarf` on each proxy process during the scenario, rendered with inferno. Rates under perf are lower than in the measured runs above (dwarf unwinding costs CPU on the same two cores).\n\n");
        for p in &r.profiles {
            let _ = writeln!(
                md,
                "### {} path, {} ({})\n\nCommand: `{}`, commit `{}`.\n",
                p.path, p.scenario, p.summary, p.command, p.commit
            );
            for (label, svg) in &p.flamegraphs {
                let _ = writeln!(md, "- {label}: [{svg}]({svg})");
            }
            md.push('\n');
        }
    }

    md.push_str("\n## Raw data\n\n`results.json` (everything above), `raw/*.json` (zring-loadgen's fortio-compatible JSON per run, iperf3's JSON per throughput run).\n");
    std::fs::write(dir.join("report.md"), md)?;
    Ok(())
}

/// Add the report to `perf-reports/README.md` (the folder's parent) and show its headline
/// there. Only for reports written inside a folder that has such a README.
pub fn update_index(dir: &Path, r: &Results) -> anyhow::Result<()> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    let readme = parent.join("README.md");
    let Ok(text) = std::fs::read_to_string(&readme) else {
        return Ok(());
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut section = format!(
        "{INDEX_START}\n\n## Latest latency-harness headline ([{name}/report.md]({name}/report.md))\n\n`{}`, commit `{}`, {} CPUs, {}, kernel {}.\n\n",
        r.command,
        r.commit,
        r.machine["nproc"],
        r.machine["cpu_model"].as_str().unwrap_or("?"),
        r.machine["kernel"].as_str().unwrap_or("?")
    );
    section.push_str(&headline_table(r));
    for p in r.paths.iter().filter(|p| p.not_run.is_some()) {
        let _ = writeln!(
            section,
            "\nNot run: {} ({}).",
            p.name,
            p.not_run.as_deref().unwrap_or("")
        );
    }
    section.push('\n');
    section.push_str(INDEX_END);
    // A run of some scenarios only (`--scenarios`) is indexed but does not replace the
    // headline: most of its figures would be blank.
    let only = r.plan.as_ref().map(|p| p.only.clone()).unwrap_or_default();
    let mut text = match (text.find(INDEX_START), text.find(INDEX_END)) {
        _ if !only.is_empty() => text,
        (Some(a), Some(b)) if b > a => {
            format!("{}{section}{}", &text[..a], &text[b + INDEX_END.len()..])
        }
        _ => format!("{}\n\n{section}\n", text.trim_end()),
    };
    let row = format!("| [{name}/report.md]({name}/report.md) |");
    if !text.contains(&row) {
        let what = if only.is_empty() {
            "latency sweep, rps sweep with CPU/RSS, max rps, throughput, connections/s, idle memory"
                .to_string()
        } else {
            format!("only: {}", only.join(", "))
        };
        let repeat = r.plan.as_ref().map_or(1, |p| p.repeat.max(1));
        let line = format!(
            "{row} latency harness: {} ({what}{}) | `{}` (root) |\n",
            ran(r)
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if repeat > 1 {
                format!("; medians of {repeat} interleaved rounds")
            } else {
                String::new()
            },
            r.command
        );
        // Append to the index table: after its last row.
        if let Some(pos) = text.find("\n\n## ") {
            text.insert_str(pos + 1, &line);
        } else {
            text.push_str(&line);
        }
    }
    std::fs::write(readme, text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rep: usize, rate: f64) -> RunResult {
        RunResult {
            scenario: "max-rps".into(),
            conns: 16,
            rate,
            rep,
            ..Default::default()
        }
    }

    fn path(name: &str, rates: &[f64]) -> PathResult {
        PathResult {
            name: name.into(),
            description: String::new(),
            not_run: None,
            error: None,
            io_backend: "-".into(),
            proxies: Vec::new(),
            runs: rates.iter().enumerate().map(|(k, &r)| run(k, r)).collect(),
        }
    }

    #[test]
    fn rounds_fold_into_medians_and_a_lead_needs_the_whole_spread() {
        let r = Results {
            paths: vec![
                path("ambient", &[30.0, 10.0, 20.0]),
                path("ztunnel", &[5.0, 9.0, 7.0]),
                path("sidecar", &[25.0, 15.0, 1.0]),
            ],
            ..Default::default()
        };
        let med = median_view(&r);
        assert_eq!(med.paths[0].runs.len(), 1);
        assert_eq!(med.paths[0].runs[0].rate, 20.0);
        let stat = |i: usize| {
            Stat::of(
                (0..3)
                    .filter_map(|k| {
                        find(&round(&r.paths[i], k), "max-rps", |_| true).map(|x| x.rate)
                    })
                    .collect(),
            )
        };
        let (amb, zt, sc) = (stat(0), stat(1), stat(2));
        assert_eq!(
            amb.map(|s| (s.med, s.min, s.max, s.n)),
            Some((20.0, 10.0, 30.0, 3))
        );
        // Every ambient round beats every ztunnel round: a lead (higher is better).
        assert_eq!(ratio_judged(amb, zt, true), "2.86x lead");
        // Lower is better (a latency): the same spreads are behind.
        assert_eq!(ratio_judged(amb, zt, false), "2.86x behind");
        // The medians differ but the spreads overlap: not a lead.
        assert_eq!(ratio_judged(amb, sc, true), "1.33x overlap");
        // One round only: the plain ratio.
        let one = Stat::of(vec![4.0]);
        assert_eq!(ratio_judged(one, Stat::of(vec![2.0]), true), "2.00x");
    }

    #[test]
    fn the_busiest_proxy_at_1000_rps_is_a_headline_row_and_each_proxy_is_in_the_latency_table() {
        let proxy = |label: &str, millicores: f64| ProxyUse {
            label: label.into(),
            millicores,
            rss_mib: 12.5,
            user_millicores: Some(millicores / 2.0),
            rss_before_mib: None,
            rss_closed_mib: None,
            closed_after_s: None,
        };
        let latency = |rep: usize, proxies: Vec<ProxyUse>| RunResult {
            scenario: "latency".into(),
            conns: 16,
            rate: 1000.0,
            rep,
            proxies,
            ..Default::default()
        };
        let mut waypoint = path("waypoint", &[]);
        waypoint.runs = [70.0, 90.0, 60.0]
            .iter()
            .enumerate()
            .map(|(k, &m)| {
                latency(
                    k,
                    vec![
                        proxy("zring node-1", 40.0),
                        proxy("zring waypoint", m),
                        proxy("zring node-2", 46.0),
                    ],
                )
            })
            .collect();
        let mut plan = crate::harness::Plan::new(true);
        plan.latency_conns = vec![16];
        let r = Results {
            paths: vec![
                PathResult {
                    runs: vec![latency(0, Vec::new())],
                    ..path("no-mesh", &[])
                },
                waypoint,
            ],
            plan: Some(plan),
            ..Default::default()
        };
        let rows = headline(&r, 16);
        let (_, vals, higher_better) = rows
            .iter()
            .find(|(m, _, _)| m.starts_with("busiest proxy process"))
            .expect("the row");
        assert!(!higher_better);
        // no-mesh has no proxy; the waypoint path's busiest is the waypoint in every round.
        assert!(vals[0].is_none());
        let st = vals[1].expect("waypoint rounds");
        assert_eq!((st.med, st.min, st.max, st.n), (70.0, 60.0, 90.0, 3));
        let dir = std::env::temp_dir().join(format!("zring-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, &r).unwrap();
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            md.contains(
                "| busiest proxy process, CPU millicores at 1000 rps, 16 conns | - | 70 (60-90) |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| zring node-1: 40m (20 user), 12.5; zring waypoint: 70m (35 user), 12.5; zring node-2: 46m (23 user), 12.5 |"),
            "{md}"
        );
    }

    #[test]
    fn a_run_of_some_scenarios_is_indexed_but_keeps_the_full_runs_headline() {
        let root = std::env::temp_dir().join(format!("zring-index-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("partial")).unwrap();
        std::fs::create_dir_all(root.join("full")).unwrap();
        let readme = root.join("README.md");
        std::fs::write(
            &readme,
            format!("| report | what | command |\n|---|---|---|\n\n## Relay\n\n{INDEX_START}\nold headline\n{INDEX_END}\n"),
        )
        .unwrap();
        let mut plan = crate::harness::Plan::new(true);
        plan.only = vec!["latency".into(), "idle".into()];
        plan.repeat = 3;
        let mut r = Results {
            command: "zring-bench run --scenarios latency,idle --repeat 3".into(),
            paths: vec![path("ambient", &[1.0])],
            plan: Some(plan),
            ..Default::default()
        };
        update_index(&root.join("partial"), &r).unwrap();
        let text = std::fs::read_to_string(&readme).unwrap();
        assert!(text.contains("old headline"), "{text}");
        assert!(
            text.contains("| [partial/report.md](partial/report.md) | latency harness: ambient (only: latency, idle; medians of 3 interleaved rounds) |"),
            "{text}"
        );
        // A run of every scenario takes the headline over.
        r.plan.as_mut().unwrap().only.clear();
        update_index(&root.join("full"), &r).unwrap();
        let text = std::fs::read_to_string(&readme).unwrap();
        assert!(!text.contains("old headline"), "{text}");
        assert!(
            text.contains("headline ([full/report.md](full/report.md))"),
            "{text}"
        );
        assert!(
            text.contains(
                "[full/report.md](full/report.md) | latency harness: ambient (latency sweep,"
            ),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
