//! Process-level helpers: file limits, CPU affinity, io-wq thread counts, and a seccomp filter
//! that makes io_uring unavailable (to exercise the epoll fallback exactly as a container
//! runtime's default profile would).

use std::{io, os::unix::process::CommandExt, process::Command};

/// Give the memory this thread's allocator heap holds but no longer uses back to the OS
/// (mimalloc's `mi_collect`). zring's binaries use mimalloc, which keeps freed pages of a
/// thread's heap until that heap allocates again; a worker that served a burst (a flood of
/// connections, 10,000 idle tunnels that then closed) and went quiet would keep its peak RSS.
/// Workers call this every few seconds: cheap when there is nothing to free.
pub fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointers and only walks the calling thread's own heap (and
    // abandoned segments); it is safe to call from any thread at any time, and is a no-op when
    // the heap holds nothing to free.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Turn transparent huge pages off for this process (`PR_SET_THP_DISABLE`), before anything
/// big is allocated. mimalloc reserves its arena as one 1 GiB region and advises the kernel to
/// back it with 2 MiB huge pages (`MADV_HUGEPAGE`); every 2 MiB stretch the heap touches then
/// costs 2 MiB of RSS however little of it is used. A fresh node proxy measured 27 MB RSS with
/// huge pages (16 MiB of it eight barely-used huge pages) and 12.5 MB without. A proxy's heap is
/// small and churns per connection; it gains nothing from huge pages and users judge its RSS.
/// The setting is the process's own and is inherited by children it spawns.
///
/// Binaries linking this crate already had this done before `main`, ahead of the allocator's
/// own start-up ([`THP_OFF_AT_START`]); calling it again returns whether it took.
pub fn disable_transparent_huge_pages() -> io::Result<()> {
    // Keep the start-up hook linked in: a static nothing refers to may be dropped by the linker.
    std::hint::black_box(&THP_OFF_AT_START);
    disable_transparent_huge_pages_now()
}

/// Give this process back the system's transparent-huge-page policy, undoing the start-up hook
/// ([`THP_OFF_AT_START`]), which every binary linking this crate gets. A benchmark driver calls
/// it first: the flag is inherited across `fork` and `exec`, and the proxies it measures for
/// comparison (Istio's ztunnel, HAProxy, Envoy) must run with their own defaults.
pub fn restore_transparent_huge_pages() -> io::Result<()> {
    // SAFETY: as in `disable_transparent_huge_pages_now`: integer arguments, no memory access.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns huge pages off before `main`, before Rust's start-up allocations and before mimalloc's
/// own constructor (priority 101) reserves and advises its arena: done in `main`, the two huge
/// pages the heap had touched by then stayed (15.9 MB fresh RSS instead of 12.6 MB). Priority
/// 100 sorts this hook just ahead of mimalloc's.
#[used]
#[link_section = ".init_array.00100"]
static THP_OFF_AT_START: extern "C" fn() = thp_off_at_start;

extern "C" fn thp_off_at_start() {
    let _ = disable_transparent_huge_pages_now();
}

fn disable_transparent_huge_pages_now() -> io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes a flag of the calling
    // process's memory map; no memory is read or written through the arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The glibc tunable that sets the copy size from which `memcpy`/`memmove` use `rep movsb`.
pub const REP_MOVSB_TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";

/// The threshold zring asks for: 1 MiB, a Zen core's L2. Copies below it use glibc's vector
/// loops; zring's largest copy is a 256 KiB relay buffer.
pub const REP_MOVSB_THRESHOLD: usize = 1 << 20;

/// Whether this process's `memcpy` is glibc's `rep movsb` one on an AMD core, where it is slow
/// for some buffer pairs (glibc bug 30994, fixed in glibc 2.39 by not using `rep movsb` below
/// the L2 size on AMD): a copy whose destination lies 1 to 63 bytes past its source's offset
/// in a 4 KiB page runs at 3.4 GB/s instead of 50 on this lab's AMD EPYC. rustls builds each TLS
/// record by copying the plaintext to 5 bytes past the start of a page-aligned buffer, so a
/// tunnel's bulk data, read page-aligned, hits exactly that case: 27% of the sending node
/// proxy's CPU was that one copy.
pub fn memcpy_needs_rep_movsb_tunable() -> bool {
    #[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
    {
        let id = std::arch::x86_64::__cpuid(0);
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&id.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&id.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&id.ecx.to_le_bytes());
        let zen = &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine";
        zen && std::arch::is_x86_feature_detected!("ermsb")
            && glibc_version().is_some_and(|v| v < (2, 39))
    }
    #[cfg(not(all(target_arch = "x86_64", target_env = "gnu")))]
    {
        false
    }
}

/// The running glibc's version, e.g. (2, 36).
#[cfg(target_env = "gnu")]
pub fn glibc_version() -> Option<(u32, u32)> {
    // SAFETY: gnu_get_libc_version takes no arguments and returns a pointer to a static,
    // NUL-terminated string owned by glibc, valid for the life of the process.
    let v = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    let mut parts = v.to_str().ok()?.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// `GLIBC_TUNABLES` with [`REP_MOVSB_TUNABLE`] put before what it already holds, or None when
/// it already sets that tunable (the user's value wins, and a re-executed process sees its own
/// setting and goes on). First, because glibc 2.36 cuts the environment block's string after
/// the first tunable it applies (`/proc/PID/environ` shows only that one; the process's own
/// view keeps the whole string): ours is in both.
pub fn tunables_with_rep_movsb(current: Option<&std::ffi::OsStr>) -> Option<std::ffi::OsString> {
    let setting = format!("{REP_MOVSB_TUNABLE}={REP_MOVSB_THRESHOLD}");
    let current = current
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    let already = current
        .split(':')
        .any(|t| t.split('=').next() == Some(REP_MOVSB_TUNABLE));
    if already {
        return None;
    }
    Some(
        if current.is_empty() {
            setting
        } else {
            format!("{setting}:{current}")
        }
        .into(),
    )
}

/// On the CPUs and glibc versions of [`memcpy_needs_rep_movsb_tunable`], run this program
/// again in place (same pid, arguments and file descriptors) with [`REP_MOVSB_TUNABLE`] set in
/// `GLIBC_TUNABLES`, which glibc reads only at start-up. Call first thing in `main`. Returns
/// `Ok(false)` when nothing was needed (another CPU, a fixed glibc, or `GLIBC_TUNABLES` already
/// sets the tunable: set it to glibc's default to opt out); does not return when it re-ran;
/// an error when the exec failed (the program goes on with the slow copy).
pub fn reexec_for_fast_memcpy() -> io::Result<bool> {
    if !memcpy_needs_rep_movsb_tunable() {
        return Ok(false);
    }
    let Some(tunables) = tunables_with_rep_movsb(std::env::var_os("GLIBC_TUNABLES").as_deref())
    else {
        return Ok(false);
    };
    let mut args = std::env::args_os();
    let Some(arg0) = args.next() else {
        return Ok(false);
    };
    let err = Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .exec();
    Err(err)
}

/// Raise `RLIMIT_NOFILE`'s soft limit to the hard limit. A proxy holds two to six fds per
/// connection (two sockets, and two pipes in splice mode); the common soft default of 1024 would
/// cap it at a few hundred connections. Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct that we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads one rlimit struct that we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// The CPUs in the calling thread's affinity mask, ascending.
pub fn thread_affinity() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 means the calling thread; `set` is a valid cpu_set_t of the size we pass.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, inside `set`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pin the calling thread to exactly one CPU.
pub fn pin_thread_to(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpu {cpu} out of range"),
        ));
    }
    // SAFETY: cpu_set_t is plain data; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE was checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 means the calling thread; `set` is valid for the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's thread id of the calling thread.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// How many io_uring io-wq worker threads (`iou-wrk-*`) a process has right now.
pub fn iowq_threads(pid: u32) -> io::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(entry) = entry else { continue };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.starts_with("iou-wrk") {
            n += 1;
        }
    }
    Ok(n)
}

/// Make `cmd`'s child run under a seccomp filter that fails `io_uring_setup` (and the other
/// io_uring syscalls) with `EPERM`, as Docker's and containerd's default profiles do. Everything
/// else is allowed. Used to test the epoll fallback against a real kernel refusal.
pub fn deny_io_uring(cmd: &mut Command) -> &mut Command {
    let filter = io_uring_deny_filter();
    // SAFETY: the closure runs in the forked child before exec and only makes two syscalls
    // (prctl), which are async-signal-safe; `filter` was built before the fork and is only read.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

fn io_uring_deny_filter() -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k, jt, jf| libc::sock_filter {
        code: JEQ_K,
        jt,
        jf,
        k,
    };
    // struct seccomp_data { int nr; __u32 arch; ... }: nr at offset 0, arch at offset 4.
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
    let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    vec![
        stmt(LD_W_ABS, 4),
        jeq(ARCH, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(LD_W_ABS, 0),
        jeq(libc::SYS_io_uring_setup as u32, 3, 0),
        jeq(libc::SYS_io_uring_enter as u32, 2, 0),
        jeq(libc::SYS_io_uring_register as u32, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(RET_K, eperm),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rep_movsb_tunable_goes_before_the_others_unless_already_set() {
        let ours = "glibc.cpu.x86_rep_movsb_threshold=1048576";
        let add = |c: Option<&str>| {
            tunables_with_rep_movsb(c.map(std::ffi::OsStr::new)).map(|v| v.into_string().unwrap())
        };
        assert_eq!(add(None).as_deref(), Some(ours));
        assert_eq!(add(Some("")).as_deref(), Some(ours));
        assert_eq!(
            add(Some("glibc.malloc.check=0")),
            Some(format!("{ours}:glibc.malloc.check=0"))
        );
        assert_eq!(add(Some("glibc.cpu.x86_rep_movsb_threshold=2112")), None);
        assert_eq!(
            add(Some(
                "glibc.malloc.check=0:glibc.cpu.x86_rep_movsb_threshold=0x840"
            )),
            None
        );
        // A longer name that starts with ours is another tunable.
        assert_eq!(
            add(Some("glibc.cpu.x86_rep_movsb_threshold_x=1")),
            Some(format!("{ours}:glibc.cpu.x86_rep_movsb_threshold_x=1"))
        );
    }
}
