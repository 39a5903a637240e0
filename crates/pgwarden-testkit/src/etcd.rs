//! A real etcd (Debian's `etcd-server`) on free ports in a temporary directory, stopped (by its
//! PID, which this process started) when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ports::free_ports;
use crate::wait::eventually;

pub struct Etcd {
    child: Child,
    client_port: u16,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits (bounded) until it takes connections.
    pub async fn start() -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-etcd")
            .tempdir()
            .expect("tempdir for etcd");
        let ports = free_ports(2);
        let (client, peer) = (ports[0], ports[1]);
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--name")
            .arg("testkit")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("testkit={peer_url}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (Debian package etcd-server; ./dev installs it)");
        let etcd = Etcd {
            child,
            client_port: client,
            _dir: dir,
        };
        eventually(
            Duration::from_secs(20),
            "etcd takes connections",
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", client))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        etcd
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn client_addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.client_port).into()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
