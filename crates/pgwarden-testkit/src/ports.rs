//! Free TCP ports on 127.0.0.1, unique across the test processes running at once.
//!
//! A port is only a promise until something binds it, and a test's PostgreSQL binds it seconds
//! later. Two guards keep concurrent tests from being handed the same port in that time:
//! ports come from below the kernel's ephemeral range (so no outgoing connection takes one),
//! and each is claimed with a lock file naming the claiming process, honoured while that
//! process lives.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;

/// Below Linux's default ephemeral range (32768-60999).
const FIRST: u16 = 12000;
const LAST: u16 = 32000;

fn claims_dir() -> PathBuf {
    std::env::temp_dir().join("pgwarden-testkit-ports")
}

/// Claims `port` for this process unless a live process holds it.
fn claim(port: u16) -> bool {
    let dir = claims_dir();
    if std::fs::create_dir_all(&dir).is_ok() {
        // Shared by every user's tests, as /tmp is (sticky: each removes only its own).
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777));
    }
    let path = dir.join(port.to_string());
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                let _ = write!(f, "{}", std::process::id());
                return true;
            }
            // A directory this user may not write to: no claim is possible, the bind check
            // alone stands.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && !path.exists() => {
                return true
            }
            Err(_) => {
                let owner = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok());
                let alive = owner.is_some_and(|pid| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
                });
                if alive {
                    return false;
                }
                // Left by a process that is gone: take it over.
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    false
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A start point that differs between processes and calls.
fn seed() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    t ^ std::process::id().wrapping_mul(2_654_435_761)
        ^ CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503)
}

/// `n` distinct ports, free and claimed by this process.
pub fn free_ports(n: usize) -> Vec<u16> {
    let span = u32::from(LAST - FIRST);
    let start = seed() % span;
    let mut out = Vec::with_capacity(n);
    for k in 0..span {
        let port = FIRST + ((start + k * 7) % span) as u16;
        if !out.contains(&port) && bindable(port) && claim(port) {
            out.push(port);
            if out.len() == n {
                return out;
            }
        }
    }
    panic!("no {n} free ports between {FIRST} and {LAST}");
}

/// A base port `p` such that `p..p+n` are free and claimed (for programs that take a port
/// range, like `pgwarden demo --port-base`).
pub fn free_port_range(n: u16) -> u16 {
    let span = u32::from(LAST - FIRST - n);
    for _ in 0..200 {
        let base = FIRST + (seed() % span) as u16;
        if (base..base + n).all(bindable) && (base..base + n).all(claim) {
            return base;
        }
    }
    panic!("no range of {n} free ports found");
}
