//! The codec and the authentication exchanges against a real PostgreSQL.

use bytes::{Bytes, BytesMut};
use pgwarden_protocol::backend::{Authentication, BackendMessage, TxStatus};
use pgwarden_protocol::frame::{decode_message, split, MAX_MESSAGE};
use pgwarden_protocol::scram::{Credential, ScramClient, ScramServer, Verifier};
use pgwarden_protocol::{frontend, md5, startup, SqlState};
use pgwarden_testkit::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn open(port: u16, user: &str) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut c = Conn {
            stream,
            buf: BytesMut::new(),
        };
        let mut out = BytesMut::new();
        startup::put_startup(&mut out, &[("user", user), ("database", "postgres")]);
        c.send(out).await;
        c
    }

    async fn send(&mut self, out: BytesMut) {
        self.stream.write_all(&out).await.expect("write");
    }

    async fn frame(&mut self) -> Bytes {
        loop {
            if let Some(f) =
                decode_message(&mut self.buf, MAX_MESSAGE).expect("server frames are valid")
            {
                return f;
            }
            let n = self.stream.read_buf(&mut self.buf).await.expect("read");
            assert!(n > 0, "server closed the connection");
        }
    }

    /// Logs in with SCRAM; returns the SQLSTATE of a failure.
    async fn scram_login(&mut self, credential: Credential) -> Result<(), SqlState> {
        let f = self.frame().await;
        let (tag, body) = split(&f);
        match BackendMessage::parse(tag, body).expect("valid") {
            BackendMessage::Authentication(Authentication::Sasl(mechs)) => {
                assert!(mechs.contains(&"SCRAM-SHA-256"))
            }
            other => panic!("expected AuthenticationSASL, got {other:?}"),
        }
        let (mut client, first) = ScramClient::new(credential);
        let mut out = BytesMut::new();
        frontend::put_sasl_initial(&mut out, "SCRAM-SHA-256", first.as_bytes());
        self.send(out).await;
        let f = self.frame().await;
        let (tag, body) = split(&f);
        let BackendMessage::Authentication(Authentication::SaslContinue(server_first)) =
            BackendMessage::parse(tag, body).expect("valid")
        else {
            panic!("expected SASLContinue")
        };
        let fin = client.server_first(server_first).expect("server-first");
        let mut out = BytesMut::new();
        frontend::put_sasl_response(&mut out, fin.as_bytes());
        self.send(out).await;
        let f = self.frame().await;
        let (tag, body) = split(&f);
        match BackendMessage::parse(tag, body).expect("valid") {
            BackendMessage::Authentication(Authentication::SaslFinal(v)) => client
                .server_final(v)
                .expect("the server proves it knows the secret"),
            BackendMessage::ErrorResponse(e) => return Err(e.code().expect("code")),
            other => panic!("unexpected {other:?}"),
        }
        self.ready().await;
        Ok(())
    }

    /// Reads until ReadyForQuery, returning everything before it.
    async fn ready(&mut self) -> Vec<Bytes> {
        let mut seen = Vec::new();
        loop {
            let f = self.frame().await;
            let (tag, body) = split(&f);
            if let BackendMessage::ReadyForQuery(status) =
                BackendMessage::parse(tag, body).expect("valid")
            {
                assert_eq!(status, TxStatus::Idle);
                return seen;
            }
            seen.push(f);
        }
    }
}

async fn rolpassword(cluster: &Cluster, role: &str) -> String {
    cluster
        .query_text(
            0,
            &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'"),
        )
        .await
        .expect("role has a password")
}

#[tokio::test]
async fn secrets_match_what_postgres_stores() {
    let cluster = Cluster::builder().build().await;
    cluster
        .execute(
            0,
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE s LOGIN PASSWORD 'pw-s'",
        )
        .await;
    let theirs =
        Verifier::parse(&rolpassword(&cluster, "s").await).expect("PostgreSQL's verifier parses");
    assert_eq!(
        Verifier::from_password("pw-s", &theirs.salt, theirs.iterations),
        theirs
    );

    cluster
        .execute(
            0,
            "SET password_encryption = 'md5'; CREATE ROLE m LOGIN PASSWORD 'pw-m'",
        )
        .await;
    assert_eq!(rolpassword(&cluster, "m").await, md5::stored("m", "pw-m"));

    // A verifier we generate is one PostgreSQL accepts logins against.
    let ours = Verifier::generate("pw-ours");
    cluster
        .execute(0, &format!("CREATE ROLE o LOGIN PASSWORD '{ours}'"))
        .await;
    assert_eq!(rolpassword(&cluster, "o").await, ours.to_string());
    let mut c = Conn::open(cluster.port(0), "o").await;
    c.scram_login(Credential::Password("pw-ours".into()))
        .await
        .expect("login with our verifier");
}

#[tokio::test]
async fn our_scram_client_logs_in_by_password_and_by_pass_through() {
    let cluster = Cluster::builder().build().await;
    cluster
        .execute(0, "CREATE ROLE u LOGIN PASSWORD 'secret-u'")
        .await;
    let port = cluster.port(0);

    let mut c = Conn::open(port, "u").await;
    c.scram_login(Credential::Password("secret-u".into()))
        .await
        .expect("password login");
    // The session works: a simple query through our codec.
    let mut out = BytesMut::new();
    frontend::put_query(&mut out, "SELECT 40 + 2");
    c.send(out).await;
    let msgs = c.ready().await;
    let tags: Vec<u8> = msgs.iter().map(|f| f[0]).collect();
    assert_eq!(tags, b"TDC");
    let (tag, body) = split(&msgs[2]);
    assert_eq!(
        BackendMessage::parse(tag, body),
        Ok(BackendMessage::CommandComplete("SELECT 1"))
    );

    // Pass-through: a proxy that holds only the server's verifier authenticates a client with
    // it, recovers the client's ClientKey, and logs into the server with that key.
    let verifier = Verifier::parse(&rolpassword(&cluster, "u").await).expect("verifier");
    let (mut client, first) = ScramClient::new(Credential::Password("secret-u".into()));
    let (server, server_first) =
        ScramServer::start(verifier.clone(), first.as_bytes()).expect("start");
    let fin = client.server_first(server_first.as_bytes()).expect("final");
    let ok = server
        .finish(fin.as_bytes())
        .expect("the client's proof is valid");
    let mut c = Conn::open(port, "u").await;
    c.scram_login(Credential::Keys {
        client_key: ok.client_key,
        server_key: verifier.server_key,
    })
    .await
    .expect("pass-through login");

    // A wrong password is 28P01.
    let mut c = Conn::open(port, "u").await;
    assert_eq!(
        c.scram_login(Credential::Password("nope".into())).await,
        Err(SqlState::INVALID_PASSWORD)
    );
}
