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
