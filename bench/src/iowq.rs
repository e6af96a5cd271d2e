//! `zring-bench iowq`: how many io-wq kernel threads each splice engine needs for idle
//! connections. The readiness engine should need none; io_uring's splice opcode blocks one io-wq
//! thread per waiting direction.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context};

use crate::sample;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Idle connections to hold open through the relay.
    #[arg(long, default_value_t = 200)]
    connections: usize,
    /// The zring binary (a release build).
    #[arg(long, default_value = "target/release/zring")]
    zring: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let echo = TcpListener::bind("127.0.0.1:0")?;
    let echo_addr = echo.local_addr()?;
    std::thread::spawn(move || {
        for c in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf = [0u8; 1024];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    println!("| relay mode | idle connections | io-wq threads | zring threads in total |\n|---|---|---|---|");
    for mode in ["splice", "splice-uring"] {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut relay = Command::new(&args.zring)
            .args([
                "relay",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--to",
                &echo_addr.to_string(),
                "--mode",
                mode,
                "--io",
                "uring",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("start zring relay")?;
        std::thread::sleep(Duration::from_millis(300));
        let mut conns = Vec::new();
        for _ in 0..args.connections {
            let mut c = TcpStream::connect(("127.0.0.1", port))?;
            // One round trip so both directions have moved data and now wait.
            c.write_all(b"x")?;
            let mut one = [0u8; 1];
            c.read_exact(&mut one)?;
            conns.push(c);
        }
        std::thread::sleep(Duration::from_millis(500));
        let pid = relay.id();
        let iowq = sample::threads_named(pid, "iou-wrk");
        let total = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count())
            .unwrap_or(0);
        println!("| {mode} | {} | {iowq} | {total} |", args.connections);
        drop(conns);
        let _ = relay.kill();
        let _ = relay.wait();
        if mode == "splice" && iowq > 0 {
            bail!("the readiness splice engine used {iowq} io-wq threads");
        }
    }
    Ok(())
}
