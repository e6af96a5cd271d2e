//! The summary printed at the end, and the fortio-compatible JSON.

use std::{collections::BTreeMap, time::Duration};

use serde_json::{json, Value};

use crate::{
    client::{Mode, RunConfig, RunOutcome},
    config::Rate,
};

/// Percentiles reported everywhere (fortio's defaults plus 90 and 99.9).
pub const PERCENTILES: [f64; 6] = [50.0, 75.0, 90.0, 99.0, 99.9, 99.99];

fn us_to_s(us: u64) -> f64 {
    us as f64 / 1e6
}

fn fmt_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.3}s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.3}ms", us / 1e3)
    } else {
        format!("{us:.0}us")
    }
}

/// Achieved requests per second in the measured window.
pub fn actual_qps(out: &RunOutcome) -> f64 {
    out.merged.hist.len() as f64 / out.actual.as_secs_f64()
}

/// The human summary.
pub fn summary(cfg: &RunConfig, out: &RunOutcome) -> String {
    let h = &out.merged.hist;
    let secs = out.actual.as_secs_f64();
    let mut s = String::new();
    s.push_str(&format!(
        "{:?} to {} ({} connections, rate {}, {:.2} s measured)\n",
        cfg.mode, cfg.target.addr, cfg.connections, cfg.rate, secs
    ));
    let bytes = out.live.bytes.load(std::sync::atomic::Ordering::Relaxed);
    if cfg.mode == Mode::TcpStream {
        s.push_str(&format!(
            "  throughput: {:.3} Gbit/s ({} MiB sent)\n",
            bytes as f64 * 8.0 / secs / 1e9,
            bytes >> 20
        ));
    } else {
        s.push_str(&format!(
            "  requests: {} completed, {:.1} per second{}\n",
            h.len(),
            actual_qps(out),
            match cfg.rate {
                Rate::Fixed(r) => format!(" (asked {r})"),
                Rate::Max => String::new(),
            }
        ));
        if !h.is_empty() {
            s.push_str(&format!(
                "  latency: min {} avg {} max {}\n",
                fmt_us(h.min() as f64),
                fmt_us(h.mean()),
                fmt_us(h.max() as f64)
            ));
            let p: Vec<String> = PERCENTILES
                .iter()
                .map(|&q| format!("p{q} {}", fmt_us(h.value_at_quantile(q / 100.0) as f64)))
                .collect();
            s.push_str(&format!("  percentiles: {}\n", p.join(", ")));
        }
        s.push_str(&format!(
            "  throughput: {:.3} Mbit/s of payload, {} sockets used\n",
            bytes as f64 * 8.0 / secs / 1e6,
            out.merged.sockets
        ));
        if !out.merged.codes.is_empty() {
            let c: Vec<String> = out
                .merged
                .codes
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            s.push_str(&format!("  status codes: {}\n", c.join(", ")));
        }
    }
    let errors = out.live.errors();
    if errors.is_empty() {
        s.push_str("  errors: none\n");
    } else {
        let e: Vec<String> = errors
            .iter()
            .map(|(k, v)| format!("{}: {v}", k.name()))
            .collect();
        s.push_str(&format!(
            "  errors: {} ({})\n",
            out.live.error_total(),
            e.join(", ")
        ));
    }
    s
}

/// fortio's result JSON, plus our extra fields (`Errors`, `Mode`, `HdrHistogram`).
pub fn fortio_json(cfg: &RunConfig, out: &RunOutcome, labels: &str, threads: usize) -> Value {
    let h = &out.merged.hist;
    let data: Vec<Value> = {
        let mut v = Vec::new();
        let mut cum = 0u64;
        let mut prev = 0u64;
        for it in h.iter_recorded() {
            let end = h.highest_equivalent(it.value_iterated_to());
            cum += it.count_at_value();
            v.push(json!({
                "Start": us_to_s(prev),
                "End": us_to_s(end),
                "Percent": if h.is_empty() { 0.0 } else { 100.0 * cum as f64 / h.len() as f64 },
                "Count": it.count_at_value(),
            }));
            prev = end;
        }
        v
    };
    let percentiles: Vec<Value> = PERCENTILES
        .iter()
        .map(|&q| json!({"Percentile": q, "Value": us_to_s(h.value_at_quantile(q / 100.0))}))
        .collect();
    let mut codes: BTreeMap<String, u64> = out
        .merged
        .codes
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    let errors: BTreeMap<&str, u64> = out
        .live
        .errors()
        .iter()
        .map(|(k, v)| (k.name(), *v))
        .collect();
    let err_total = out.live.error_total();
    if err_total > 0 {
        // fortio counts transport errors under code -1.
        codes.insert("-1".into(), err_total);
    }
    let mut hdr = Vec::new();
    let serialized = hdrhistogram::serialization::Serializer::serialize(
        &mut hdrhistogram::serialization::V2Serializer::new(),
        h,
        &mut hdr,
    )
    .is_ok();
    json!({
        "RunType": if cfg.mode == Mode::Http { "HTTP" } else { "TCP" },
        "Mode": cfg.mode,
        "Labels": labels,
        "StartTime": humantime::format_rfc3339_nanos(out.start_time).to_string(),
        "RequestedQPS": cfg.rate.to_string(),
        "RequestedDuration": humantime::format_duration(cfg.duration).to_string(),
        "ActualQPS": actual_qps(out),
        "ActualDuration": out.actual.as_nanos() as u64,
        "NumThreads": cfg.connections,
        "RuntimeThreads": threads,
        "URL": format!("{}{}", cfg.target.host, if cfg.mode == Mode::Http { cfg.target.path.as_str() } else { "" }),
        "Jitter": cfg.jitter,
        "SocketCount": out.merged.sockets,
        "DurationHistogram": {
            "Count": h.len(),
            "Min": us_to_s(h.min()),
            "Max": us_to_s(h.max()),
            "Sum": h.mean() * h.len() as f64 / 1e6,
            "Avg": h.mean() / 1e6,
            "StdDev": h.stdev() / 1e6,
            "Data": data,
            "Percentiles": percentiles,
        },
        "RetCodes": codes,
        "Errors": errors,
        "BytesPerSecond": out.live.bytes.load(std::sync::atomic::Ordering::Relaxed) as f64 / out.actual.as_secs_f64(),
        "HdrHistogram": if serialized { Value::String(base64(&hdr)) } else { Value::Null },
        "HdrHistogramUnit": "microseconds",
    })
}

/// Standard base64 (the HdrHistogram log format's encoding of V2 histograms).
fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A one-line progress update.
pub fn progress_line(
    elapsed: Duration,
    completed: u64,
    errors: u64,
    p99_us: Option<u64>,
) -> String {
    format!(
        "\r[{:5.1}s] {:>9} done, {:>8.0}/s, {} errors, current p99 {}   ",
        elapsed.as_secs_f64(),
        completed,
        completed as f64 / elapsed.as_secs_f64().max(1e-9),
        errors,
        p99_us
            .map(|u| fmt_us(u as f64))
            .unwrap_or_else(|| "-".into())
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(super::base64(b"hello"), "aGVsbG8=");
        assert_eq!(super::base64(b"hi"), "aGk=");
        assert_eq!(super::base64(b""), "");
    }
}
