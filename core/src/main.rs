//! The `zring` binary. See `zring --help`.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};
use zring_core::{cmd::relay as relay_cmd, logging};
use zring_runtime::{
    net::ConnectOptions,
    relay::{RelayMode, RelayOptions, DEFAULT_COPY_BUFFER, DEFAULT_PIPE_SIZE},
    BackendChoice, ShutdownTrigger, WorkerConfig,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// zring: a node proxy for Istio's ambient mesh, on io_uring with one thread per core.
///
/// With no subcommand, runs a self-contained demo on loopback.
#[derive(Debug, Parser)]
#[command(name = "zring", version, about)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text", env = "LOG_FORMAT")]
    log_format: logging::LogFormat,
    /// Log level filter (overrides RUST_LOG), e.g. `info` or `zring_core=debug`.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Forward TCP from one address to another (a debugging tool and the relay benchmark subject).
    Relay(RelayArgs),
    /// The node proxy: ztunnel's job (outbound capture/SOCKS5, inbound HBONE and plaintext, L4
    /// policy, metrics, admin, readiness, config reload).
    Run(Box<RunArgs>),
    /// The mesh's waypoint (L7): a workload of the mesh config on a node of its own; HBONE in,
    /// HTTP routing and policy (VirtualService/DestinationRule, HTTPRoute, AuthorizationPolicy
    /// from --resources), HBONE out to each endpoint with the waypoint's own identity. Takes
    /// `zring run`'s options (config, node name, certificates, admin, metrics...).
    Waypoint(Box<WaypointArgs>),
    /// The node proxy configured as Istio's ztunnel chart configures ztunnel: container args
    /// `proxy ztunnel`, everything else from ztunnel's environment variables (NODE_NAME,
    /// LOCAL_XDS_PATH, FAKE_CA, INPOD_UDS, ZTUNNEL_CPU_LIMIT, TERMINATION_GRACE_PERIOD_SECONDS,
    /// ISTIO_META_*, ...; see the README). In-pod mode on /var/run/ztunnel/ztunnel.sock.
    Proxy {
        /// `ztunnel` (the only mode; the chart passes it).
        #[arg(default_value = "ztunnel")]
        mode: String,
    },
    /// An istiod stand-in for clusters without istiod, demos and tests: delta ADS (workloads,
    /// services and policies from ztunnel's local config file, watched; changes pushed) and
    /// Istio's CreateCertificate (CSRs signed by a CA directory's root), over TLS.
    ControlPlane(ControlPlaneArgs),
    /// A local certificate authority: `init` a root, `issue` workload certificates.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The node agent's side of ZDS (for places without istio-cni): `run` the daemon, `add` and
    /// `remove` pods.
    NodeAgent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Carry plain TCP over one HBONE hop (mTLS + HTTP/2 CONNECT): `server` and `client` ends.
    Tunnel {
        #[command(subcommand)]
        command: TunnelCommand,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// ztunnel's local YAML config (workloads, services, policies). Without it, the config
    /// comes over xDS from --xds-address.
    #[arg(long, env = "LOCAL_XDS_PATH", required_unless_present = "xds_address")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    xds: XdsArgs,
    /// This node's name: workloads whose `node` matches are local.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// CA directory issuing the local workloads' certificates (zring ca init).
    #[arg(
        long,
        required_unless_present_any = ["cert_dir", "ca_address"],
        conflicts_with = "cert_dir"
    )]
    ca_dir: Option<std::path::PathBuf>,
    /// Istio's CA (istiod or `zring control-plane`), e.g. https://istiod.istio-system.svc:15012:
    /// certificates through CreateCertificate (when neither --ca-dir nor --cert-dir is given).
    #[arg(long, env = "CA_ADDRESS")]
    ca_address: Option<String>,
    /// The root the CA's certificate must chain to; also the mesh's trust bundle.
    #[arg(
        long,
        env = "CA_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    ca_root_ca: std::path::PathBuf,
    /// The name the CA's certificate must carry (default: the address's host).
    #[arg(long, env = "ALT_CA_HOSTNAME")]
    alt_ca_hostname: Option<String>,
    /// Certificate directory instead of a CA: root-cert.pem and, per identity,
    /// <namespace>/<service account>/cert-chain.pem and key.pem; re-read when they change.
    #[arg(long)]
    cert_dir: Option<std::path::PathBuf>,
    /// Serve SOCKS5 outbound on this address (off by default; ztunnel uses 127.0.0.1:15080).
    #[arg(long)]
    socks5: Option<SocketAddr>,
    /// Outbound capture listener: connections redirected here (iptables REDIRECT, or TPROXY
    /// with --transparent) go to their original destination through the mesh. In-pod and
    /// dedicated mode use 15001; off by default.
    #[arg(long)]
    outbound_addr: Option<SocketAddr>,
    /// Inbound plaintext capture listener (15006): redirected connections are checked against
    /// the destination's policy with no identity and delivered. Off by default.
    #[arg(long)]
    inbound_plaintext_addr: Option<SocketAddr>,
    /// IP_TRANSPARENT on the capture listeners (TPROXY; needs CAP_NET_ADMIN).
    #[arg(long)]
    transparent: bool,
    /// In-pod mode: take pods from the node agent over ZDS at this socket (istio-cni's, or
    /// `zring node-agent run`); each pod gets 15001, 15006 and 15008 inside its namespace.
    #[arg(long, env = "INPOD_UDS")]
    zds_socket: Option<std::path::PathBuf>,
    /// Admin endpoint: /config_dump, /logging, /quitquitquit. Keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15000", value_parser = opt_addr)]
    admin_addr: OptAddr,
    /// Prometheus endpoint: /metrics, /stats/prometheus ("off" disables).
    #[arg(long, default_value = "0.0.0.0:15020", value_parser = opt_addr)]
    stats_addr: OptAddr,
    /// Readiness endpoint: /healthz/ready ("off" disables).
    #[arg(long, default_value = "0.0.0.0:15021", value_parser = opt_addr)]
    readiness_addr: OptAddr,
    /// Inbound HBONE port.
    #[arg(long, default_value_t = 15008)]
    hbone_port: u16,
    /// SO_MARK on zring's upstream sockets so capture rules can skip them (needs CAP_NET_ADMIN;
    /// 0 turns it off).
    #[arg(long, default_value_t = zring_core::proxy::DEFAULT_PACKET_MARK)]
    packet_mark: u32,
    /// Originate HBONE connections from the source workload's IP (loopback setups).
    #[arg(long)]
    bind_source: bool,
    #[command(flatten)]
    workers: WorkerArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    dns: DnsArgs,
    /// On SIGTERM (and when a pod leaves), how long live connections may finish before they
    /// are closed. Default as ztunnel: TERMINATION_GRACE_PERIOD_SECONDS minus 5 s (minus 1 s
    /// when it is 10 or less), else 5 s.
    #[arg(long, env = "CONNECTION_TERMINATION_DEADLINE", value_parser = zring_core::config::duration_flag)]
    drain_timeout: Option<Duration>,
    /// Lifetime of the certificates --ca-dir issues (renewed at half-life).
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = zring_core::config::duration_flag)]
    cert_ttl: Duration,
}

#[derive(Debug, clap::Args)]
struct WaypointArgs {
    #[command(flatten)]
    run: RunArgs,
    /// A file or folder of Kubernetes resources as users `kubectl apply` them: VirtualService,
    /// DestinationRule, HTTPRoute, AuthorizationPolicy, RequestAuthentication, and the `istio`
    /// ConfigMap for its extension providers (other kinds are skipped). Re-read when it
    /// changes; a bad file is refused and the rules in force kept.
    #[arg(long)]
    resources: Option<std::path::PathBuf>,
    /// The waypoint's Gateway name (`istio.io/gateway-name`): policies select or target it.
    #[arg(long, env = "GATEWAY_NAME", default_value = "waypoint")]
    gateway_name: String,
    /// The Gateway's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    gateway_namespace: String,
    /// Istio's root namespace (policies there targeting the istio-waypoint GatewayClass apply
    /// to every waypoint).
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Default limit of one request until its response head (a route's own timeout takes
    /// precedence and covers the whole response, body included).
    #[arg(long, default_value = "60s", value_parser = zring_core::config::duration_flag)]
    request_timeout: Duration,
    /// How long an endpoint that failed (connect error, reset) is skipped.
    #[arg(long, default_value = "10s", value_parser = zring_core::config::duration_flag)]
    ejection_time: Duration,
    /// A client connection with no request in flight (including one still sending its
    /// request head) is closed after this long.
    #[arg(long, default_value = "300s", value_parser = zring_core::config::duration_flag)]
    idle_timeout: Duration,
}

fn waypoint(a: WaypointArgs, trigger: &ShutdownTrigger) -> anyhow::Result<()> {
    let mut cfg = run_config(a.run)?;
    cfg.waypoint = Some(zring_core::waypoint::WaypointSettings {
        resources: a.resources,
        gateway_name: a.gateway_name,
        namespace: a.gateway_namespace,
        root_namespace: a.root_namespace,
        request_timeout: a.request_timeout,
        ejection: a.ejection_time,
        idle_timeout: a.idle_timeout,
        ..Default::default()
    });
    zring_core::proxy::run(cfg, trigger)
}

/// The config from a control plane over delta xDS (istiod, or `zring control-plane`).
#[derive(Debug, clap::Args)]
struct XdsArgs {
    /// The control plane, e.g. https://istiod.istio-system.svc:15012 (used when --config is not
    /// given).
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: Option<String>,
    /// The root the control plane's certificate must chain to.
    #[arg(
        long,
        env = "XDS_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    xds_root_ca: std::path::PathBuf,
    /// The name the control plane's certificate must carry (default: the address's host).
    #[arg(long, env = "ALT_XDS_HOSTNAME")]
    alt_xds_hostname: Option<String>,
    /// Bearer token file sent to the control plane (re-read for every new stream).
    #[arg(
        long,
        env = "AUTH_TOKEN",
        default_value = "./var/run/secrets/tokens/istio-token"
    )]
    auth_token: std::path::PathBuf,
}

/// The DNS proxy (ztunnel's: on unless `ISTIO_META_DNS_CAPTURE` is false).
#[derive(Debug, clap::Args)]
struct DnsArgs {
    /// Serve DNS on --dns-addr: inside every pod's namespace in in-pod mode (istio-cni's DNS
    /// capture sends port 53 there), else in zring's own namespace.
    #[arg(long, env = "ISTIO_META_DNS_CAPTURE", default_value = "true", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    dns_proxy: bool,
    /// Where the DNS proxy listens (ztunnel's DNS_PROXY_ADDR metadata; `localhost:PORT`
    /// means 127.0.0.1 and ::1).
    #[arg(long, env = "ISTIO_META_DNS_PROXY_ADDR", default_value = "127.0.0.1:15053", value_parser = dns_addr)]
    dns_addr: SocketAddr,
    /// Upstream resolvers for names outside the mesh (repeat or comma-separate); default: the
    /// nameservers of /etc/resolv.conf.
    #[arg(long, value_delimiter = ',')]
    dns_upstream: Vec<SocketAddr>,
    /// Time limit per upstream for a forwarded question.
    #[arg(long, default_value = "5s", value_parser = zring_core::config::duration_flag)]
    dns_timeout: Duration,
    /// Questions in flight before new ones get SERVFAIL at once.
    #[arg(long, default_value_t = zring_core::dns::DEFAULT_MAX_IN_FLIGHT)]
    dns_max_in_flight: usize,
}

impl DnsArgs {
    fn settings(&self, mark: Option<u32>) -> Option<zring_core::dns::DnsSettings> {
        if !self.dns_proxy {
            return None;
        }
        let mut s = zring_core::dns::DnsSettings::from_resolv_conf(
            self.dns_addr,
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        );
        if !self.dns_upstream.is_empty() {
            s.upstreams = self.dns_upstream.clone();
        }
        s.timeout = self.dns_timeout;
        s.max_in_flight = self.dns_max_in_flight.max(1);
        s.mark = mark;
        Some(s)
    }
}

fn dns_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Some(port) = s.strip_prefix("localhost:") {
        return port
            .parse::<u16>()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .map_err(|e| format!("{s:?}: bad port: {e}"));
    }
    s.parse()
        .map_err(|e| format!("{s:?} is not an address like 127.0.0.1:15053: {e}"))
}

/// Handshake, response and keepalive limits (durations like `10s`, `500ms`, `2m`).
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// TLS handshake limit on 15008, both sides, counted from accept (or from the TCP connect).
    #[arg(long, default_value = "10s", value_parser = zring_core::config::duration_flag)]
    tls_handshake_timeout: Duration,
    /// HTTP/2 preface and SETTINGS limit after TLS.
    #[arg(long, default_value = "10s", value_parser = zring_core::config::duration_flag)]
    h2_handshake_timeout: Duration,
    /// How long an outbound CONNECT waits for the destination's answer.
    #[arg(long, default_value = "15s", value_parser = zring_core::config::duration_flag)]
    connect_response_timeout: Duration,
    /// Close an inbound HBONE connection that opened no stream this long after its handshake.
    #[arg(long, default_value = "60s", value_parser = zring_core::config::duration_flag)]
    idle_no_stream_timeout: Duration,
    /// HTTP/2 PING interval on HBONE connections, both sides (0s: no keepalive).
    #[arg(long, default_value = "10s", value_parser = zring_core::config::duration_flag)]
    ping_interval: Duration,
    /// An unanswered PING after this long closes the connection.
    #[arg(long, default_value = "20s", value_parser = zring_core::config::duration_flag)]
    ping_timeout: Duration,
    /// A SOCKS5 client must finish its greeting and request within this.
    #[arg(long, default_value = "10s", value_parser = zring_core::config::duration_flag)]
    socks5_greeting_timeout: Duration,
    /// Unfinished handshakes (TLS on 15008, SOCKS5 greetings) per listener and worker; past it
    /// new connections are closed at once and counted.
    #[arg(long, default_value_t = zring_core::proxy::DEFAULT_MAX_HANDSHAKES)]
    max_handshakes: usize,
    /// TCP keepalive idle time on HBONE connections (0s: off).
    #[arg(long, env = "KEEPALIVE_TIME", default_value = "180s", value_parser = zring_core::config::duration_flag)]
    tcp_keepalive_time: Duration,
    /// TCP keepalive probe interval.
    #[arg(long, env = "KEEPALIVE_INTERVAL", default_value = "180s", value_parser = zring_core::config::duration_flag)]
    tcp_keepalive_interval: Duration,
    /// Unanswered TCP keepalive probes before the connection is dropped.
    #[arg(long, env = "KEEPALIVE_RETRIES", default_value_t = 9)]
    tcp_keepalive_retries: u32,
}

impl LimitArgs {
    fn limits(&self) -> zring_core::proxy::Limits {
        zring_core::proxy::Limits {
            timeouts: zring_hbone::settings::Timeouts {
                tls_handshake: self.tls_handshake_timeout,
                h2_handshake: self.h2_handshake_timeout,
                connect_response: self.connect_response_timeout,
                idle_no_stream: self.idle_no_stream_timeout,
                ping_interval: self.ping_interval,
                ping_timeout: self.ping_timeout,
                hook: None,
            },
            socks5_greeting: self.socks5_greeting_timeout,
            max_handshakes: self.max_handshakes.max(1),
            tcp_keepalive: (!self.tcp_keepalive_time.is_zero()).then_some(
                zring_runtime::net::TcpKeepalive {
                    time: self.tcp_keepalive_time,
                    interval: self.tcp_keepalive_interval,
                    retries: self.tcp_keepalive_retries,
                },
            ),
        }
    }
}

fn node_agent(c: AgentCommand, trigger: &ShutdownTrigger) -> anyhow::Result<()> {
    use zring_core::cmd::node_agent as agent;
    let answer = match c {
        AgentCommand::Run {
            socket,
            packet_mark,
            no_rules,
            dns_capture,
        } => {
            return agent::run(
                agent::AgentConfig {
                    socket,
                    mark: packet_mark,
                    rules: !no_rules,
                    dns_capture,
                },
                trigger,
            )
        }
        AgentCommand::Add {
            socket,
            netns,
            uid,
            name,
            namespace,
            service_account,
        } => agent::request(
            &socket,
            &agent::Request::Add {
                uid,
                name,
                namespace,
                service_account,
                netns,
            },
        )?,
        AgentCommand::Remove { socket, uid } => {
            agent::request(&socket, &agent::Request::Remove { uid })?
        }
    };
    match answer.error {
        None if answer.ok => {
            println!("ok");
            Ok(())
        }
        e => Err(anyhow::anyhow!(
            "the node agent refused: {}",
            e.unwrap_or_else(|| "no reason given".into())
        )),
    }
}

/// An address, or `off`.
#[derive(Debug, Clone, Copy)]
struct OptAddr(Option<SocketAddr>);

fn opt_addr(s: &str) -> Result<OptAddr, String> {
    if s == "off" {
        return Ok(OptAddr(None));
    }
    s.parse()
        .map(|a| OptAddr(Some(a)))
        .map_err(|e| format!("{s:?} is not an address like 127.0.0.1:15000 or \"off\": {e}"))
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Listen on the ZDS socket (as istio-cni does) and on `<socket>.control` for add/remove.
    Run {
        /// The ZDS socket.
        #[arg(long, env = "INPOD_UDS", default_value = zring_core::zds::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// The proxy's packet mark, excluded from capture.
        #[arg(long, default_value_t = zring_core::proxy::DEFAULT_PACKET_MARK)]
        packet_mark: u32,
        /// Do not install redirection rules (protocol only).
        #[arg(long)]
        no_rules: bool,
        /// Also capture the pods' DNS (UDP and TCP port 53 -> 15053), as istio-cni does with
        /// ambient DNS capture on. Only for proxies that serve DNS on 15053.
        #[arg(long, env = "AMBIENT_DNS_CAPTURE")]
        dns_capture: bool,
    },
    /// Enroll a pod: redirection rules in its namespace, then AddWorkload to the proxy.
    Add {
        /// The agent's ZDS socket.
        #[arg(long, env = "INPOD_UDS", default_value = zring_core::zds::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// The pod's network namespace (/var/run/netns/NAME or /proc/PID/ns/net).
        #[arg(long)]
        netns: std::path::PathBuf,
        /// Pod uid.
        #[arg(long)]
        uid: String,
        /// Pod name.
        #[arg(long)]
        name: String,
        /// Namespace.
        #[arg(long)]
        namespace: String,
        /// Service account.
        #[arg(long)]
        service_account: String,
    },
    /// Take a pod out: DelWorkload, then remove its rules.
    Remove {
        /// The agent's ZDS socket.
        #[arg(long, env = "INPOD_UDS", default_value = zring_core::zds::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// Pod uid.
        #[arg(long)]
        uid: String,
    },
}

#[derive(Debug, clap::Args)]
struct ControlPlaneArgs {
    /// ztunnel's local config file (the mesh), watched for changes.
    #[arg(long)]
    config: std::path::PathBuf,
    /// CA directory (root-cert.pem, root-key.pem; `zring ca init`): signs the workloads' CSRs
    /// and the serving certificate (for istiod.istio-system.svc, istiod and the listen IP).
    #[arg(long)]
    ca_dir: std::path::PathBuf,
    /// Listen address (istiod's port is 15012).
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: SocketAddr,
    /// Require `authorization: Bearer <the file's content>` on every call (off by default).
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// How often the config file is checked for changes.
    #[arg(long, default_value = "1s", value_parser = zring_core::config::duration_flag)]
    poll: Duration,
}

fn control_plane(a: ControlPlaneArgs, trigger: &ShutdownTrigger) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let t = trigger.clone();
    rt.block_on(zring_core::xds::server::serve(
        zring_core::xds::server::ControlPlaneConfig {
            config: a.config,
            ca_dir: a.ca_dir,
            listen: a.listen,
            token_file: a.token_file,
            poll: a.poll,
        },
        async move {
            while !t.is_triggered() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    ))
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create root-cert.pem and root-key.pem (ECDSA P-256) in DIR; refuses to overwrite.
    Init {
        /// CA directory.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Trust domain written into the root's subject.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Issue a workload certificate: writes PREFIXcert-chain.pem, PREFIXkey.pem, PREFIXroot-cert.pem.
    Issue {
        /// CA directory (root-cert.pem + root-key.pem; an existing plug-in root works).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The workload identity, spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
        #[arg(long)]
        spiffe: zring_hbone::SpiffeId,
        /// Output path prefix, e.g. `certs/sleep-`.
        #[arg(long)]
        out: String,
        /// Lifetime in seconds (default 24 h, Istio's).
        #[arg(long, default_value_t = zring_hbone::ca::DEFAULT_WORKLOAD_TTL.as_secs())]
        ttl: u64,
    },
}

#[derive(Debug, clap::Args)]
struct TunnelArgs {
    /// Address to accept on.
    #[arg(long)]
    listen: SocketAddr,
    /// CA directory (zring ca init).
    #[arg(long)]
    ca_dir: std::path::PathBuf,
    /// The SPIFFE identity this end presents.
    #[arg(long)]
    identity: zring_hbone::SpiffeId,
    /// SO_MARK for upstream connections.
    #[arg(long)]
    packet_mark: Option<u32>,
    #[command(flatten)]
    workers: WorkerArgs,
}

#[derive(Debug, Subcommand)]
enum TunnelCommand {
    /// Terminate HBONE and connect each CONNECT stream to its target.
    Server(TunnelArgs),
    /// Accept TCP and carry it to TARGET through an HBONE server.
    Client {
        #[command(flatten)]
        common: TunnelArgs,
        /// The HBONE server, ip:port.
        #[arg(long)]
        server: SocketAddr,
        /// The CONNECT target behind the server, ip:port.
        #[arg(long)]
        target: SocketAddr,
        /// The identity the server must prove.
        #[arg(long)]
        expect: zring_hbone::SpiffeId,
    },
}

fn tunnel_common(a: TunnelArgs) -> zring_core::cmd::tunnel::TunnelCommon {
    zring_core::cmd::tunnel::TunnelCommon {
        listen: a.listen,
        ca_dir: a.ca_dir,
        identity: a.identity,
        workers: a.workers.config(),
        h2: zring_hbone::H2Settings::default(),
        connect: ConnectOptions {
            mark: a.packet_mark,
            timeout: Some(relay_cmd::DEFAULT_CONNECT_TIMEOUT),
            ..ConnectOptions::default()
        },
    }
}

#[derive(Debug, clap::Args)]
struct WorkerArgs {
    /// Worker threads; default: the CPUs allowed by affinity and cgroup quota.
    #[arg(long)]
    workers: Option<usize>,
    /// Pin each worker to a CPU: auto (only when there is a worker for every allowed CPU), on,
    /// or off (the scheduler places them; for CPUs shared with busy neighbours).
    #[arg(long, env = "ZRING_PIN", default_value = "auto")]
    pin: zring_runtime::Pinning,
    /// I/O backend: auto (io_uring, else epoll), uring (fail if unavailable), or epoll.
    #[arg(long, default_value = "auto")]
    io: BackendChoice,
}

impl WorkerArgs {
    fn config(&self) -> WorkerConfig {
        WorkerConfig {
            workers: self.workers,
            io: self.io,
            pin: self.pin,
            ..WorkerConfig::default()
        }
    }
}

#[derive(Debug, clap::Args)]
struct RelayArgs {
    /// Address to accept connections on; repeat `--listen A --to B` to forward several.
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Address to forward the connections of the `--listen` in the same position to.
    #[arg(long, required = true)]
    to: Vec<SocketAddr>,
    /// splice (zero-copy, default), copy (buffered), or splice-uring (io_uring's splice opcode,
    /// executed by kernel io-wq threads; for measurement).
    #[arg(long, default_value = "splice")]
    mode: RelayMode,
    /// Copy mode: buffer size per direction, in bytes.
    #[arg(long, default_value_t = DEFAULT_COPY_BUFFER)]
    buffer_size: usize,
    /// Splice mode: pipe size per direction, in bytes (F_SETPIPE_SZ; 64 KiB minimum).
    #[arg(long, default_value_t = DEFAULT_PIPE_SIZE)]
    pipe_size: usize,
    /// Close a connection idle (no byte either way) for this many seconds; 0 = never.
    #[arg(long, default_value_t = 0)]
    idle_timeout: u64,
    /// Upstream connect timeout in seconds.
    #[arg(long, default_value_t = relay_cmd::DEFAULT_CONNECT_TIMEOUT.as_secs())]
    connect_timeout: u64,
    /// After SIGTERM, how many seconds live connections get to finish.
    #[arg(long, default_value_t = relay_cmd::DEFAULT_DRAIN_TIMEOUT.as_secs_f64())]
    drain_timeout: f64,
    /// SO_MARK for upstream connections.
    #[arg(long)]
    packet_mark: Option<u32>,
    #[command(flatten)]
    workers: WorkerArgs,
}

fn main() -> std::process::ExitCode {
    // Before anything else: on AMD cores with glibc < 2.39, run again with glibc's `rep movsb`
    // copy limited to large buffers (it is 15x slower for the copy rustls makes of every record).
    let memcpy = zring_runtime::sys::reexec_for_fast_memcpy();
    // First, before the heap grows: 2 MiB pages would hold a mostly empty heap (see the helper).
    let thp = zring_runtime::sys::disable_transparent_huge_pages();
    let cli = Cli::parse();
    logging::init(cli.log_format, cli.log_level.as_deref());
    zring_runtime::server::install_panic_hook();
    if let Err(e) = memcpy {
        tracing::warn!(error = %e, "could not re-run with glibc.cpu.x86_rep_movsb_threshold set; TLS records are copied with the slow rep movsb");
    }
    if let Err(e) = thp {
        tracing::debug!(error = %e, "transparent huge pages stay on (PR_SET_THP_DISABLE refused)");
    }
    let trigger = ShutdownTrigger::new();
    if let Err(e) = trigger.on_signals() {
        eprintln!("zring: cannot install signal handlers: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let result = match cli.command {
        None => zring_core::demo::run(&trigger),
        Some(Command::Relay(args)) => {
            relay_config(args).and_then(|cfg| relay_cmd::run(cfg, &trigger))
        }
        Some(Command::Run(a)) => match run_config(*a) {
            Ok(cfg) => zring_core::proxy::run(cfg, &trigger),
            Err(e) => Err(e),
        },
        Some(Command::Waypoint(w)) => waypoint(*w, &trigger),
        Some(Command::Proxy { mode }) => proxy_ztunnel(&mode, &trigger),
        Some(Command::ControlPlane(a)) => control_plane(a, &trigger),
        Some(Command::NodeAgent { command }) => node_agent(command, &trigger),
        Some(Command::Ca {
            command: CaCommand::Init { dir, trust_domain },
        }) => zring_core::cmd::ca::init(&dir, &trust_domain),
        Some(Command::Ca {
            command:
                CaCommand::Issue {
                    dir,
                    spiffe,
                    out,
                    ttl,
                },
        }) => zring_core::cmd::ca::issue(&dir, &spiffe, &out, Duration::from_secs(ttl)),
        Some(Command::Tunnel {
            command: TunnelCommand::Server(a),
        }) => zring_core::cmd::tunnel::run_server(tunnel_common(a), &trigger),
        Some(Command::Tunnel {
            command:
                TunnelCommand::Client {
                    common,
                    server,
                    target,
                    expect,
                },
        }) => {
            let t = zring_core::cmd::tunnel::TunnelClient {
                server,
                target,
                expect,
                pool: Default::default(),
            };
            zring_core::cmd::tunnel::run_client(tunnel_common(common), t, &trigger)
        }
    };
    finish(result)
}

fn finish(result: anyhow::Result<()>) -> std::process::ExitCode {
    let code = match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("zring: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    logging::flush();
    code
}

/// `zring proxy ztunnel`: the node proxy from ztunnel's environment.
fn proxy_ztunnel(mode: &str, trigger: &ShutdownTrigger) -> anyhow::Result<()> {
    if mode != "ztunnel" {
        anyhow::bail!("zring proxy {mode}: the only mode is `ztunnel` (Istio's ztunnel chart passes `proxy ztunnel`)");
    }
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let setup = zring_core::cmd::ztunnel_env::setup(&env)?;
    for note in &setup.notes {
        tracing::warn!("{note}");
    }
    tracing::info!(proxy = ?setup.proxy, config = %setup.run.config.display(), zds = ?setup.run.zds_socket, workers = ?setup.run.workers.workers, "zring proxy ztunnel: configured from the ztunnel environment");
    zring_core::proxy::run(setup.run, trigger)
}

fn relay_config(a: RelayArgs) -> anyhow::Result<relay_cmd::RelayConfig> {
    Ok(relay_cmd::RelayConfig {
        routes: relay_cmd::Route::pair(&a.listen, &a.to)?,
        relay: RelayOptions {
            mode: relay_cmd::mode_with_buffer(a.mode, a.buffer_size),
            pipe_size: a.pipe_size,
            idle_timeout: (a.idle_timeout > 0)
                .then(|| Duration::from_secs(a.idle_timeout).min(zring_core::config::MAX_DURATION)),
        },
        connect: ConnectOptions {
            mark: a.packet_mark,
            timeout: (a.connect_timeout > 0).then(|| {
                Duration::from_secs(a.connect_timeout).min(zring_core::config::MAX_DURATION)
            }),
            ..ConnectOptions::default()
        },
        workers: a.workers.config(),
        drain_timeout: zring_core::config::seconds(a.drain_timeout.max(0.0), "--drain-timeout")
            .map_err(|e| anyhow::anyhow!(e))?,
    })
}

/// The node proxy's settings from `zring run`'s arguments (also the base of `zring waypoint`).
fn run_config(a: RunArgs) -> anyhow::Result<zring_core::proxy::RunConfig> {
    Ok(zring_core::proxy::RunConfig {
        xds: match (
            &a.config,
            a.xds.xds_address.as_deref().filter(|s| !s.is_empty()),
        ) {
            (None, Some(address)) => Some(zring_core::cmd::ztunnel_env::xds_settings(
                address,
                a.xds.xds_root_ca.clone(),
                a.xds.alt_xds_hostname.clone(),
                Some(a.xds.auth_token.clone()),
                &std::env::vars().collect(),
            )),
            _ => None,
        },
        config: a.config.clone().unwrap_or_else(|| {
            format!("xds:{}", a.xds.xds_address.clone().unwrap_or_default()).into()
        }),
        node: a.node_name,
        certs: match (a.ca_dir, a.cert_dir, a.ca_address.filter(|s| !s.is_empty())) {
            (Some(ca), _, _) => zring_core::proxy::CertSource::Ca(ca),
            (None, Some(dir), _) => zring_core::proxy::CertSource::Files(dir),
            (None, None, Some(address)) => {
                zring_core::proxy::CertSource::IstioCa(zring_core::cmd::ztunnel_env::ca_settings(
                    &address,
                    a.ca_root_ca.clone(),
                    a.alt_ca_hostname.clone(),
                    Some(a.xds.auth_token.clone()),
                    &std::env::vars().collect(),
                ))
            }
            (None, None, None) => {
                return Err(anyhow::anyhow!(
                    "no certificate source: --ca-dir, --cert-dir or --ca-address"
                ))
            }
        },
        socks5: a.socks5,
        outbound: a.outbound_addr,
        inbound_plaintext: a.inbound_plaintext_addr,
        transparent: a.transparent,
        admin: a.admin_addr.0,
        stats: a.stats_addr.0,
        readiness: a.readiness_addr.0,
        zds_socket: a.zds_socket,
        hbone_port: a.hbone_port,
        mark: (a.packet_mark != 0).then_some(a.packet_mark),
        bind_source: a.bind_source,
        workers: a.workers.config(),
        limits: a.limits.limits(),
        drain_timeout: a.drain_timeout.unwrap_or_else(|| {
            zring_core::cmd::ztunnel_env::drain_from_grace(
                std::env::var("TERMINATION_GRACE_PERIOD_SECONDS")
                    .ok()
                    .as_deref(),
            )
        }),
        cert_ttl: a.cert_ttl,
        dns: a
            .dns
            .settings((a.packet_mark != 0).then_some(a.packet_mark)),
        waypoint: None,
    })
}
