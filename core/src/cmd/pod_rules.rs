//! The in-pod redirection rules istio-cni installs in an ambient pod's network namespace, exactly
//! (iptables-save form, so both ztunnel and zring run under the rules a cluster has), and the
//! policy route that lets replies to connections made with a client's source address come back
//! to the proxy.
//!
//! - mangle: packets the proxy sent into the pod (mark `0x539/0xfff`, ztunnel's 1337) mark
//!   their connection `0x111`; the pod's replies on such connections get the mark back.
//! - nat: inbound TCP is redirected to 15006 except HBONE (15008), loopback and the proxy's own;
//!   outbound TCP to 15001 except loopback, the proxy's own and replies (`0x111`); kubelet
//!   probes SNATed to 169.254.7.127 pass untouched; with DNS capture, UDP and TCP port 53 go to
//!   15053.
//! - raw (DNS capture only): DNS to and from the proxy in conntrack zone 1, apart from the pod's.
//! - `ip rule add fwmark 0x111/0xfff pref 32764 lookup 100` and `ip route add local 0.0.0.0/0
//!   dev lo table 100`: packets marked `0x111` are delivered locally (to the proxy's transparent
//!   socket) instead of being routed away.
//!
//! The IPv6 set is the same with `::1/128` and the IPv6 probe address; it is installed only when
//! the pod has a global IPv6 address.

use std::{path::Path, process::Command};

/// Where istio-cni SNATs kubelet probes (IPv4).
pub const PROBE_SNAT_V4: &str = "169.254.7.127";
/// Where istio-cni SNATs kubelet probes (IPv6).
pub const PROBE_SNAT_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";
/// The connection mark of connections the proxy made into the pod.
pub const CONN_MARK: &str = "0x111/0xfff";
/// The routing table and rule preference of the local-delivery route.
pub const ROUTE_TABLE: &str = "100";
/// `ip rule` preference of the fwmark rule.
pub const RULE_PREF: &str = "32764";

/// The rules for one IP family, in `iptables-restore --noflush` form. `mark` is the proxy's
/// packet mark (1337 = 0x539); `dns` adds the DNS capture lines.
pub fn render(v6: bool, mark: u32, dns: bool) -> String {
    let m = format!("{mark:#x}/0xfff");
    let (lo, probe) = if v6 {
        ("::1/128", PROBE_SNAT_V6)
    } else {
        ("127.0.0.1/32", PROBE_SNAT_V4)
    };
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line("*mangle".into());
    line(":ISTIO_PRERT - [0:0]".into());
    line(":ISTIO_OUTPUT - [0:0]".into());
    line("-A PREROUTING -j ISTIO_PRERT".into());
    line("-A OUTPUT -j ISTIO_OUTPUT".into());
    line(format!(
        "-A ISTIO_PRERT -m mark --mark {m} -j CONNMARK --set-xmark {CONN_MARK}"
    ));
    line(format!("-A ISTIO_OUTPUT -m connmark --mark {CONN_MARK} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"));
    line("COMMIT".into());
    line("*nat".into());
    line(":ISTIO_PRERT - [0:0]".into());
    line(":ISTIO_OUTPUT - [0:0]".into());
    line("-A OUTPUT -j ISTIO_OUTPUT".into());
    line("-A PREROUTING -j ISTIO_PRERT".into());
    line(format!("-A ISTIO_PRERT -s {probe} -p tcp -m tcp -j ACCEPT"));
    line(format!(
        "-A ISTIO_OUTPUT -d {probe} -p tcp -m tcp -j ACCEPT"
    ));
    line(format!("-A ISTIO_PRERT ! -d {lo} -p tcp ! --dport 15008 -m mark ! --mark {m} -j REDIRECT --to-ports 15006"));
    if dns {
        line(format!("-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark {m} -m udp --dport 53 -j REDIRECT --to-port 15053"));
        line(format!("-A ISTIO_OUTPUT ! -d {lo} -p tcp --dport 53 -m mark ! --mark {m} -j REDIRECT --to-ports 15053"));
    }
    line(format!(
        "-A ISTIO_OUTPUT -p tcp -m mark --mark {CONN_MARK} -j ACCEPT"
    ));
    line(format!("-A ISTIO_OUTPUT ! -d {lo} -o lo -j ACCEPT"));
    line(format!(
        "-A ISTIO_OUTPUT ! -d {lo} -p tcp -m mark ! --mark {m} -j REDIRECT --to-ports 15001"
    ));
    line("COMMIT".into());
    if dns {
        line("*raw".into());
        line(":ISTIO_OUTPUT - [0:0]".into());
        line(":ISTIO_PRERT - [0:0]".into());
        line("-A PREROUTING -j ISTIO_PRERT".into());
        line("-A OUTPUT -j ISTIO_OUTPUT".into());
        line(format!(
            "-A ISTIO_OUTPUT -p udp -m mark --mark {m} -m udp --dport 53 -j CT --zone 1"
        ));
        line(format!(
            "-A ISTIO_PRERT -p udp -m mark ! --mark {m} -m udp --sport 53 -j CT --zone 1"
        ));
        line("COMMIT".into());
    }
    out
}

/// Run `cmd args` inside the network namespace at `netns`, feeding `stdin`.
fn run_in(netns: &Path, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nsenter {}: {e}", args.join(" ")))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input
            .write_all(text.as_bytes())
            .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether the pod has a global IPv6 address (then the IPv6 set is installed too).
fn has_ipv6(netns: &Path) -> bool {
    Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-6", "-o", "addr", "show", "scope", "global"])
        .output()
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false)
}

/// Install the rules and the policy route in the pod's namespace (replacing any earlier set).
pub fn install(netns: &Path, mark: u32, dns: bool) -> Result<(), String> {
    remove(netns);
    let mut families = vec![false];
    if has_ipv6(netns) {
        families.push(true);
    }
    for v6 in families {
        let (restore, ip, any) = if v6 {
            ("ip6tables-restore", "-6", "::/0")
        } else {
            ("iptables-restore", "-4", "0.0.0.0/0")
        };
        run_in(
            netns,
            &[restore, "-w", "--noflush"],
            Some(&render(v6, mark, dns)),
        )?;
        policy_route(netns, ip, any, "add")?;
    }
    Ok(())
}

/// `ip rule {op} fwmark 0x111/0xfff pref 32764 lookup 100` and `ip route {op} local <any> dev
/// lo table 100` for one family (`ip` is `-4` or `-6`).
fn policy_route(netns: &Path, ip: &str, any: &str, op: &str) -> Result<(), String> {
    let rule = [
        "ip",
        ip,
        "rule",
        op,
        "fwmark",
        CONN_MARK,
        "pref",
        RULE_PREF,
        "lookup",
        ROUTE_TABLE,
    ];
    let rule = run_in(netns, &rule, None);
    let route = [
        "ip",
        ip,
        "route",
        op,
        "local",
        any,
        "dev",
        "lo",
        "table",
        ROUTE_TABLE,
    ];
    // Both are tried (a removal cleans up whichever is there); the first error is reported.
    rule.and(run_in(netns, &route, None))
}

/// Take the rules and the route out again (whatever of them is there).
pub fn remove(netns: &Path) {
    for (ipt, ip, any) in [("iptables", "-4", "0.0.0.0/0"), ("ip6tables", "-6", "::/0")] {
        for table in ["mangle", "nat", "raw"] {
            let _ = run_in(
                netns,
                &[
                    ipt,
                    "-w",
                    "-t",
                    table,
                    "-D",
                    "PREROUTING",
                    "-j",
                    "ISTIO_PRERT",
                ],
                None,
            );
            let _ = run_in(
                netns,
                &[ipt, "-w", "-t", table, "-D", "OUTPUT", "-j", "ISTIO_OUTPUT"],
                None,
            );
            for chain in ["ISTIO_PRERT", "ISTIO_OUTPUT"] {
                let _ = run_in(netns, &[ipt, "-w", "-t", table, "-F", chain], None);
                let _ = run_in(netns, &[ipt, "-w", "-t", table, "-X", chain], None);
            }
        }
        let _ = policy_route(netns, ip, any, "del");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// istio-cni's in-pod rules (IPv4, DNS capture on), as `iptables-save` prints them.
    const ISTIO_CNI_V4: &str = "\
*mangle
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_PRERT -s 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -d 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-port 15053
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
*raw
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1
-A ISTIO_PRERT -p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1
COMMIT
";

    #[test]
    fn the_rules_are_istio_cnis_line_for_line() {
        assert_eq!(render(false, 1337, true), ISTIO_CNI_V4);
        let no_dns = render(false, 1337, false);
        assert!(!no_dns.contains("15053") && !no_dns.contains("*raw"));
        assert!(no_dns.contains("--to-ports 15001") && no_dns.contains("--to-ports 15006"));
        let v6 = render(true, 1337, false);
        assert!(v6.contains(PROBE_SNAT_V6) && v6.contains("! -d ::1/128"));
        assert!(!v6.contains("127.0.0.1"));
    }
}
