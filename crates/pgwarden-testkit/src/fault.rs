//! A TCP fault proxy to put between a component and what it talks to (an agent and etcd):
//! it forwards bytes both ways until told to cut, blackhole or delay them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Close every connection and every new one at once (the peer sees resets).
    Cut,
    /// Accept, but forward nothing until the mode changes (a partition: the peer sees
    /// silence, then the held bytes once healed, as TCP retransmission would deliver them).
    Blackhole,
    /// Forward every chunk after this delay.
    Delay(Duration),
}

pub struct FaultProxy {
    port: u16,
    mode: Arc<watch::Sender<Fault>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fault proxy");
        let port = listener.local_addr().expect("addr").port();
        let (tx, _) = watch::channel(Fault::Pass);
        let mode = Arc::new(tx);
        let m = mode.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if *m.borrow() == Fault::Cut {
                    drop(client);
                    continue;
                }
                let rx = m.subscribe();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        relay(client, server, rx).await;
                    }
                });
            }
        });
        FaultProxy { port, mode, task }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set(&self, fault: Fault) {
        self.mode.send_replace(fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, mode: watch::Receiver<Fault>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, mode.clone());
    let down = pump(sr, cw, mode);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = wait_for_cut(&mut mode) => return,
        };
        loop {
            let m = *mode.borrow_and_update();
            match m {
                Fault::Pass => break,
                Fault::Cut => return,
                Fault::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Fault::Blackhole => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn wait_for_cut(mode: &mut watch::Receiver<Fault>) {
    loop {
        if *mode.borrow_and_update() == Fault::Cut {
            return;
        }
        if mode.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, within: Duration) -> bool {
        let mut b = [0u8; 4];
        s.write_all(b"ping").await.is_ok()
            && matches!(
                tokio::time::timeout(within, s.read_exact(&mut b)).await,
                Ok(Ok(_))
            )
    }

    #[tokio::test]
    async fn pass_blackhole_delay_cut() {
        let p = FaultProxy::start(echo_server().await).await;
        let mut s = TcpStream::connect(("127.0.0.1", p.port()))
            .await
            .expect("connect");
        assert!(roundtrip(&mut s, Duration::from_secs(2)).await, "pass");
        p.set(Fault::Blackhole);
        assert!(
            !roundtrip(&mut s, Duration::from_millis(300)).await,
            "blackholed"
        );
        p.set(Fault::Pass);
        let mut b = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b))
            .await
            .expect("held bytes arrive after the heal")
            .expect("read");
        p.set(Fault::Delay(Duration::from_millis(300)));
        let t = std::time::Instant::now();
        assert!(roundtrip(&mut s, Duration::from_secs(3)).await, "delayed");
        assert!(t.elapsed() >= Duration::from_millis(300));
        p.set(Fault::Cut);
        assert!(!roundtrip(&mut s, Duration::from_millis(500)).await, "cut");
        let mut fresh = TcpStream::connect(("127.0.0.1", p.port()))
            .await
            .expect("accepted");
        assert!(
            !roundtrip(&mut fresh, Duration::from_millis(500)).await,
            "new ones cut too"
        );
    }
}
