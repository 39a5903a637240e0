//! Free TCP ports on 127.0.0.1.

use std::net::TcpListener;

/// `n` distinct ports that were free a moment ago (the kernel picks them from its ephemeral range,
/// so concurrent test processes rarely collide; a collision shows as a failed start, not a hang).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port on 127.0.0.1"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("bound socket has an address").port())
        .collect()
}

/// A base port `p` such that `p..p+n` were all free a moment ago (for programs that take a
/// port range, like `pgwarden demo --port-base`).
pub fn free_port_range(n: u16) -> u16 {
    for _ in 0..200 {
        let base = free_ports(1)[0];
        if u32::from(base) + u32::from(n) > 65535 {
            continue;
        }
        let all_free = (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no range of {n} free ports found");
}
