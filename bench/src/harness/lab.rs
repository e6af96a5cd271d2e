//! The harness's machine room: two "nodes" and two "pods" as network namespaces joined by veth
//! pairs, built fresh for every path and removed afterwards - also when the harness is
//! interrupted (SIGINT/SIGTERM/SIGHUP) or a previous run was killed outright.
//!
//! ```text
//!  client pod 10.241.1.2 ──veth── node-1 10.241.0.1 ──veth── node-2 10.241.0.2 ──veth── server pod 10.241.2.2
//! ```
//!
//! Every path runs over this same wiring, so the paths differ only in what they add on top.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// Namespace names start with this, then the harness's pid: `zrh<pid>-<role>`.
pub const PREFIX: &str = "zrh";
pub const CLIENT_IP: &str = "10.241.1.2";
pub const SERVER_IP: &str = "10.241.2.2";
pub const NODE1_IP: &str = "10.241.0.1";
pub const NODE2_IP: &str = "10.241.0.2";

/// What must go if the harness is interrupted: namespaces (with every process inside them),
/// processes outside them (perf), and scratch folders.
#[derive(Default)]
struct Registry {
    namespaces: Vec<String>,
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    namespaces: Vec::new(),
    pids: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Clean up and exit on SIGINT, SIGTERM or SIGHUP. Call once, before building anything.
pub fn install_interrupt_cleanup() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("cleanup".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                eprintln!("zring-bench: signal {sig}: removing the lab and stopping");
                let reg = std::mem::take(&mut *registry());
                for pid in reg.pids {
                    kill(pid);
                }
                for ns in reg.namespaces {
                    delete_namespace(&ns);
                }
                for d in reg.dirs {
                    let _ = std::fs::remove_dir_all(d);
                }
                std::process::exit(128 + sig);
            }
        })?;
    Ok(())
}

fn kill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Kill every process inside `ns`, then delete it (its veth ends go with it).
fn delete_namespace(ns: &str) {
    let me = std::process::id();
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .filter(|p| *p != me)
        {
            kill(pid);
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Remove namespaces left by harness runs that were killed outright (their pid is gone).
pub fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for name in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing {name}, left by an earlier run (pid {pid} is gone)");
            delete_namespace(name);
        }
    }
}

/// A child process that is killed when dropped and also on interrupt.
pub struct Proc {
    pub child: Child,
    pub log: Option<PathBuf>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Fail with the log if the process has exited.
    pub fn check_alive(&mut self, what: &str) -> anyhow::Result<()> {
        if let Ok(Some(st)) = self.child.try_wait() {
            bail!("{what} exited ({st}):\n{}", tail(&self.log_text(), 30));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pid = self.child.id();
        registry().pids.retain(|p| *p != pid);
    }
}

/// Spawn `cmd` with stdout and stderr going to `log` (or nowhere), registered for interrupt
/// cleanup.
pub fn spawn(mut cmd: Command, log: Option<PathBuf>) -> anyhow::Result<Proc> {
    cmd.stdin(Stdio::null());
    match &log {
        Some(path) => {
            let f = std::fs::File::create(path)?;
            cmd.stdout(f.try_clone()?).stderr(f);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("spawn {:?}", cmd.get_program()))?;
    registry().pids.push(child.id());
    Ok(Proc { child, log })
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// A scratch folder removed on drop and on interrupt.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(format!("zring-harness-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        registry().dirs.push(p.clone());
        Ok(Self(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        registry().dirs.retain(|d| d != &self.0);
    }
}

/// One network namespace of the lab.
#[derive(Debug)]
pub struct Ns {
    pub name: String,
}

impl Ns {
    /// `ip netns exec NAME program` (which execs: the child's pid is the program's).
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    pub fn sh(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = self.cmd(args[0]).args(&args[1..]).output()?;
        if !out.status.success() {
            bail!(
                "{} in {}: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

impl Drop for Ns {
    /// Kill everything inside and delete the namespace (its veth ends go with it).
    fn drop(&mut self) {
        delete_namespace(&self.name);
        registry().namespaces.retain(|n| n != &self.name);
    }
}

/// The four namespaces; each (and everything running inside) goes on drop.
#[derive(Debug)]
pub struct Lab {
    pub node1: Ns,
    pub node2: Ns,
    pub client: Ns,
    pub server: Ns,
}

impl Lab {
    pub fn build() -> anyhow::Result<Lab> {
        let id = std::process::id();
        let mk = |role: &str| -> anyhow::Result<Ns> {
            let name = format!("{PREFIX}{id}-{role}");
            delete_namespace(&name);
            let st = Command::new("ip")
                .args(["netns", "add", &name])
                .stderr(Stdio::piped())
                .output()?;
            if !st.status.success() {
                bail!(
                    "cannot create network namespace {name} (the harness needs root): {}",
                    String::from_utf8_lossy(&st.stderr).trim()
                );
            }
            registry().namespaces.push(name.clone());
            let ns = Ns { name };
            ns.sh(&["ip", "link", "set", "lo", "up"])?;
            // Connection-per-request runs reuse 4-tuples within TIME_WAIT, and proxies open as
            // many upstream connections as they accept: room for both, in the lab only.
            ns.sh(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
            ns.sh(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"])?;
            Ok(ns)
        };
        // A failure part-way drops (deletes) the namespaces made so far.
        let lab = Lab {
            node1: mk("node1")?,
            node2: mk("node2")?,
            client: mk("client")?,
            server: mk("server")?,
        };
        lab.wire()?;
        Ok(lab)
    }

    fn wire(&self) -> anyhow::Result<()> {
        let link = |a: &Ns, an: &str, b: &Ns, bn: &str| -> anyhow::Result<()> {
            let out = Command::new("ip")
                .args(["link", "add", an, "netns", &a.name, "type", "veth"])
                .args(["peer", "name", bn, "netns", &b.name])
                .output()?;
            if !out.status.success() {
                bail!("veth {an}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            a.sh(&["ip", "link", "set", an, "up"])?;
            b.sh(&["ip", "link", "set", bn, "up"])
        };
        link(&self.node1, "n1n2", &self.node2, "n2n1")?;
        for (pod, node, ip, node_ip) in [
            (&self.client, &self.node1, CLIENT_IP, NODE1_IP),
            (&self.server, &self.node2, SERVER_IP, NODE2_IP),
        ] {
            link(pod, "eth0", node, "pod0")?;
            pod.sh(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            pod.sh(&[
                "ip",
                "route",
                "add",
                "10.241.0.0/16",
                "dev",
                "eth0",
                "src",
                ip,
            ])?;
            node.sh(&["ip", "addr", "add", &format!("{node_ip}/32"), "dev", "pod0"])?;
            node.sh(&["ip", "route", "add", ip, "dev", "pod0"])?;
            node.sh(&["sysctl", "-qw", "net.ipv4.conf.pod0.proxy_arp=1"])?;
        }
        for (node, ip, dev, remote_pods) in [
            (&self.node1, NODE1_IP, "n1n2", "10.241.2.0/24"),
            (&self.node2, NODE2_IP, "n2n1", "10.241.1.0/24"),
        ] {
            node.sh(&["ip", "addr", "add", &format!("{ip}/32"), "dev", dev])?;
            node.sh(&["ip", "route", "add", remote_pods, "dev", dev])?;
            node.sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            node.sh(&["sysctl", "-qw", &format!("net.ipv4.conf.{dev}.proxy_arp=1")])?;
        }
        Ok(())
    }
}

/// Poll `ok` every 50 ms for up to `secs` seconds.
pub fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `GET path` over a fresh connection from inside `ns` (bash /dev/tcp), returning at most
/// `max` bytes of the response (the whole response when `None`); used to check that a path
/// carries traffic before measuring it, and to read readiness and metrics.
pub fn http_get(ns: &Ns, addr: &str, path: &str, max: Option<usize>) -> String {
    let (host, port) = addr.split_once(':').unwrap_or((addr, "80"));
    let read = max.map_or("cat".to_string(), |n| format!("head -c {n}"));
    ns.cmd("bash")
        .args([
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{host}/{port} && printf 'GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3 && timeout 3 {read} <&3"
            ),
        ])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

/// The status line of `GET path` from inside `ns` is 200.
pub fn get_ok(ns: &Ns, addr: &str, path: &str) -> bool {
    http_get(ns, addr, path, Some(200)).contains(" 200 ")
}
