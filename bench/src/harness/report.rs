//! `report.md` and its SVG charts from `results.json`, and the index in `perf-reports/README.md`.

use std::{fmt::Write, path::Path};

use super::{
    svg::{color, line_chart, Series},
    PathResult, Results, RunResult,
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

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The headline rows: (metric, value per path, higher is better).
fn headline(r: &Results, conns: usize) -> Vec<(String, Vec<Option<f64>>, bool)> {
    let paths: Vec<&PathResult> = ran(r).collect();
    let col = |f: &dyn Fn(&PathResult) -> Option<f64>| paths.iter().map(|p| f(p)).collect();
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
    // zring's ambient path against each baseline that ran: Istio's ztunnel and the sidecars.
    let amb = names.iter().position(|n| *n == "ambient");
    let baselines: Vec<(usize, &str)> = ["ztunnel", "sidecar"]
        .into_iter()
        .filter_map(|b| names.iter().position(|n| *n == b).map(|i| (i, b)))
        .filter(|_| amb.is_some())
        .collect();
    let _ = write!(s, "| metric | {} |", names.join(" | "));
    for (_, b) in &baselines {
        let _ = write!(s, " ambient / {b} |");
    }
    s.push('\n');
    let _ = write!(
        s,
        "|---|{}{}",
        "---|".repeat(names.len()),
        "---|".repeat(baselines.len())
    );
    s.push('\n');
    for (metric, vals, _) in headline(r, conns) {
        let digits = if metric.contains(" ms,") {
            3
        } else if metric.starts_with("Gbit") || metric.contains("MiB") {
            2
        } else {
            0
        };
        let _ = write!(
            s,
            "| {metric} | {} |",
            vals.iter()
                .map(|v| opt(*v, digits))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        if let Some(a) = amb {
            for (b, _) in &baselines {
                let _ = write!(s, " {} |", ratio(vals[a], vals[*b]));
            }
        }
        s.push('\n');
    }
    if !baselines.is_empty() {
        let names: Vec<String> = baselines
            .iter()
            .map(|(_, b)| format!("ambient / {b}"))
            .collect();
        let _ = writeln!(
            s,
            "\n{}: below 1 is better for latency, CPU and memory; above 1 is better for rates and throughput.",
            names.join(", ")
        );
    }
    s
}

pub fn write(dir: &Path, r: &Results) -> anyhow::Result<()> {
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
    md.push_str("\nThe sidecar path stands in for Istio's Envoy sidecars with HAProxy (Debian's): HTTP mode for HTTP, TCP mode for echo and iperf3, mutual TLS with the same CA, certificate chain verified; it does not check the peer's SPIFFE identity against a policy (the ambient path does, with an L4 allow policy on the server). zring's access logs are off in the harness, like HAProxy's.\n\n");

    md.push_str("## Headline\n\n");
    // Human reading of the numbers, kept across re-renders.
    let notes = std::fs::read_to_string(dir.join("notes.md")).unwrap_or_default();
    md.push_str(&headline_table(r));
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
            "## Latency: HTTP at {} rps, by connections\n\nmilliseconds; delta = this path minus no-mesh at the same connection count.\n\n| conns | path | achieved rps | p50 | p90 | p99 | p99.9 | max | delta p50 | delta p99 | errors |\n|---|---|---|---|---|---|---|---|---|---|---|",
            plan.latency_rps
        );
        for &c in &plan.latency_conns {
            for p in &paths {
                let Some(x) = latency_at(p, c) else { continue };
                let b = base.and_then(|b| latency_at(b, c));
                let _ = writeln!(
                    md,
                    "| {c} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} |",
                    p.name,
                    x.rate,
                    x.p50_ms,
                    x.p90_ms,
                    x.p99_ms,
                    x.p999_ms,
                    x.max_ms,
                    b.map_or("-".into(), |b| format!("{:+.3}", x.p50_ms - b.p50_ms)),
                    b.map_or("-".into(), |b| format!("{:+.3}", x.p99_ms - b.p99_ms)),
                    x.errors
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
                let px: Vec<String> = x
                    .proxies
                    .iter()
                    .map(|q| format!("{}: {:.0}m, {:.1}", q.label, q.millicores, q.rss_mib))
                    .collect();
                let _ = writeln!(
                    md,
                    "| {rps} | {} | {:.0} | {:.3} | {:.3} | {} | {} | {:.0}% |",
                    p.name,
                    x.rate,
                    x.p50_ms,
                    x.p99_ms,
                    x.errors,
                    if px.is_empty() {
                        "-".into()
                    } else {
                        px.join("; ")
                    },
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
    md.push_str("\n## Memory with idle tunneled connections\n\nThe client pod opens N connections to the echo app through the path, proves each with a one-byte echo, and holds them; RSS of each proxy before and after (2 s later). A sample of the connections echoes again after the measurement.\n\n| path | connections | proxy: RSS before -> after (MiB) | KiB per connection (all proxies) |\n|---|---|---|---|\n");
    for p in &paths {
        for x in p.runs.iter().filter(|x| x.scenario == "idle") {
            if let Some(note) = &x.note {
                let _ = writeln!(md, "| {} | {} | {note} | - |", p.name, x.conns);
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
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.1} |",
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
    let mut text = match (text.find(INDEX_START), text.find(INDEX_END)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{section}{}", &text[..a], &text[b + INDEX_END.len()..])
        }
        _ => format!("{}\n\n{section}\n", text.trim_end()),
    };
    let row = format!("| [{name}/report.md]({name}/report.md) |");
    if !text.contains(&row) {
        let line = format!(
            "{row} latency harness: {} (latency sweep, rps sweep with CPU/RSS, max rps, throughput, connections/s, idle memory) | `{}` (root) |\n",
            ran(r).map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "),
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
