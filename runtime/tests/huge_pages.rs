//! The start-up hook turns transparent huge pages off in every binary linking the runtime, and a
//! benchmark driver can give its children the system's policy back.

use std::process::Command;

fn thp_enabled(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_string)
}

#[test]
fn the_hook_turns_huge_pages_off_and_a_driver_restores_them_for_children() {
    let me = std::process::id();
    let Some(before) = thp_enabled(me) else {
        eprintln!("SKIPPED: this kernel has no THP_enabled line in /proc/PID/status");
        return;
    };
    // This test binary links zring-runtime: the hook ran before main.
    assert_eq!(before, "0", "the start-up hook did not turn huge pages off");
    let mut off = Command::new("sleep").arg("5").spawn().unwrap();
    assert_eq!(thp_enabled(off.id()).as_deref(), Some("0"), "inherited");
    let _ = off.kill();
    let _ = off.wait();

    zring_runtime::sys::restore_transparent_huge_pages().unwrap();
    let mut child = Command::new("sleep").arg("5").spawn().unwrap();
    let child_flag = thp_enabled(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        child_flag.as_deref(),
        Some("1"),
        "the child still has huge pages off"
    );
    zring_runtime::sys::disable_transparent_huge_pages().unwrap();
    assert_eq!(thp_enabled(me).as_deref(), Some("0"));
}
