//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it: no channel binding (`n,,` or
//! `y,,`), the user name sent in the startup packet rather than in `n=`.
//!
//! [`ScramServer`] authenticates a client against a [`Verifier`] and, on success, hands back the
//! client's `ClientKey` (recovered from its proof). [`ScramClient`] logs into a server with a
//! password or, for pass-through, with that `ClientKey`: a proxy that knows only a user's
//! verifier can then log into a server holding the same verifier.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

pub const MECHANISM: &str = "SCRAM-SHA-256";
const DEFAULT_ITERATIONS: u32 = 4096;
const NONCE_BYTES: usize = 18;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("password authentication failed")]
    BadProof,
    #[error("the server's SCRAM signature is wrong")]
    BadServerSignature,
    #[error("the server rejected the SCRAM exchange: {0}")]
    ServerError(String),
}

type Key = [u8; 32];

fn hmac(key: &[u8], msg: &[u8]) -> Key {
    let mut m =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

fn sha256(b: &[u8]) -> Key {
    Sha256::digest(b).into()
}

/// `Hi()`: PBKDF2-HMAC-SHA-256 with one 32-byte block.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> Key {
    let mut first = salt.to_vec();
    first.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &first);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        out.iter_mut().zip(u.iter()).for_each(|(o, x)| *o ^= x);
    }
    out
}

/// SASLprep as PostgreSQL applies it: if the password cannot be prepared it is used as is.
fn normalize(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(p) => p.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn nonce() -> String {
    let mut b = [0u8; NONCE_BYTES];
    rand::thread_rng().fill_bytes(&mut b);
    B64.encode(b)
}

/// A stored SCRAM secret: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Key,
    pub server_key: Key,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(***)")
    }
}

impl Verifier {
    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let key = |k: &str| -> Option<Key> { B64.decode(k).ok()?.try_into().ok() };
        Some(Verifier {
            iterations: iterations.parse().ok().filter(|&i| i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let salted = salted_password(&normalize(password), salt, iterations);
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&hmac(&salted, b"Client Key")),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// A verifier with a fresh random salt.
    /// A verifier no password satisfies, made without key derivation: for running the exchange
    /// with a user that does not exist, at no cost to the server.
    pub fn decoy() -> Verifier {
        let mut rng = rand::thread_rng();
        let mut v = Verifier {
            iterations: DEFAULT_ITERATIONS,
            salt: vec![0; 16],
            stored_key: [0; 32],
            server_key: [0; 32],
        };
        rng.fill_bytes(&mut v.salt);
        rng.fill_bytes(&mut v.stored_key);
        rng.fill_bytes(&mut v.server_key);
        v
    }

    pub fn generate(password: &str) -> Verifier {
        let mut salt = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::from_password(password, &salt, DEFAULT_ITERATIONS)
    }
}

impl std::fmt::Display for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// Splits `a=...,b=...` into attribute values, checking the expected order of names.
fn attributes<const N: usize>(msg: &str, names: [char; N]) -> Result<[&str; N], ScramError> {
    let mut parts = msg.splitn(N, ',');
    let mut out = [""; N];
    for (slot, name) in out.iter_mut().zip(names) {
        let part = parts
            .next()
            .ok_or(ScramError::Malformed("missing attribute"))?;
        let value = part
            .strip_prefix(name)
            .and_then(|p| p.strip_prefix('='))
            .ok_or(ScramError::Malformed("unexpected attribute"))?;
        *slot = value;
    }
    Ok(out)
}

fn utf8(b: &[u8]) -> Result<&str, ScramError> {
    std::str::from_utf8(b).map_err(|_| ScramError::Malformed("not UTF-8"))
}

/// The server side of one exchange.
#[derive(Debug)]
pub struct ScramServer {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

/// A successful authentication.
#[derive(Debug)]
pub struct ServerSuccess {
    /// The `AuthenticationSASLFinal` payload.
    pub server_final: String,
    /// The client's `ClientKey`, for logging into servers on its behalf.
    pub client_key: Key,
}

impl ScramServer {
    /// Reads the client-first message; returns the server-first message to send.
    pub fn start(
        verifier: Verifier,
        client_first: &[u8],
    ) -> Result<(ScramServer, String), ScramError> {
        let msg = utf8(client_first)?;
        let bare = match msg.get(..3) {
            Some("n,,") | Some("y,,") => &msg[3..],
            _ if msg.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad GS2 header")),
        };
        let [_user, client_nonce] = attributes(bare, ['n', 'r'])?;
        if client_nonce.is_empty()
            || client_nonce.contains(',')
            || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b))
        {
            return Err(ScramError::Malformed("bad nonce"));
        }
        let nonce = format!("{client_nonce}{}", nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            ScramServer {
                verifier,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Reads the client-final message and checks the proof.
    pub fn finish(self, client_final: &[u8]) -> Result<ServerSuccess, ScramError> {
        let msg = utf8(client_final)?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let [binding, nonce] = attributes(without_proof, ['c', 'r'])?;
        if binding != "biws" && binding != "eSws" {
            // base64("n,,") or base64("y,,"): anything else claims channel binding.
            return Err(ScramError::ChannelBinding);
        }
        if !constant_time_eq(nonce.as_bytes(), self.nonce.as_bytes()) {
            return Err(ScramError::Nonce);
        }
        let proof: Key = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("bad proof"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        client_key
            .iter_mut()
            .zip(signature.iter())
            .for_each(|(k, s)| *k ^= s);
        if !constant_time_eq(&sha256(&client_key), &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(ServerSuccess {
            server_final: format!("v={}", B64.encode(server_signature)),
            client_key,
        })
    }
}

/// What a client proves itself with.
#[derive(Clone)]
pub enum Credential {
    Password(String),
    /// Pass-through: the `ClientKey` recovered by [`ScramServer`] and the `ServerKey` of the same
    /// verifier (to check the server's signature).
    Keys {
        client_key: Key,
        server_key: Key,
    },
}

/// The client side of one exchange.
pub struct ScramClient {
    credential: Credential,
    client_first_bare: String,
    nonce: String,
    expected_server_signature: Option<Key>,
}

impl ScramClient {
    /// Returns the client and the client-first message (for SASLInitialResponse).
    pub fn new(credential: Credential) -> (ScramClient, String) {
        let nonce = nonce();
        let bare = format!("n=,r={nonce}");
        let first = format!("n,,{bare}");
        (
            ScramClient {
                credential,
                client_first_bare: bare,
                nonce,
                expected_server_signature: None,
            },
            first,
        )
    }

    /// Reads the server-first message; returns the client-final message.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<String, ScramError> {
        let server_first = utf8(msg)?;
        let [nonce, salt, iterations] = attributes(server_first, ['r', 's', 'i'])?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::Malformed("bad salt"))?;
        let iterations: u32 = iterations
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or(ScramError::Malformed("bad iteration count"))?;
        let (client_key, server_key) = match &self.credential {
            Credential::Password(p) => {
                let salted = salted_password(&normalize(p), &salt, iterations);
                (hmac(&salted, b"Client Key"), hmac(&salted, b"Server Key"))
            }
            Credential::Keys {
                client_key,
                server_key,
            } => (*client_key, *server_key),
        };
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hmac(&sha256(&client_key), auth_message.as_bytes());
        let mut proof = client_key;
        proof
            .iter_mut()
            .zip(signature.iter())
            .for_each(|(p, s)| *p ^= s);
        self.expected_server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final message.
    pub fn server_final(&self, msg: &[u8]) -> Result<(), ScramError> {
        let msg = utf8(msg)?;
        if let Some(e) = msg.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.to_string()));
        }
        let [v] = attributes(msg, ['v'])?;
        let got = B64
            .decode(v)
            .map_err(|_| ScramError::Malformed("bad signature"))?;
        match &self.expected_server_signature {
            Some(want) if constant_time_eq(want, &got) => Ok(()),
            _ => Err(ScramError::BadServerSignature),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_round_trips_and_matches_postgres_format() {
        let v = Verifier::from_password("secret", b"0123456789abcdef", 4096);
        let text = v.to_string();
        assert!(text.starts_with("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$"));
        assert_eq!(Verifier::parse(&text), Some(v));
        for bad in [
            "",
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$0:AA==$AA==:AA==",
            "md5abc",
            "SCRAM-SHA-256$4096:!!$a:b",
        ] {
            assert_eq!(Verifier::parse(bad), None, "{bad}");
        }
    }

    fn exchange(verifier: &Verifier, credential: Credential) -> Result<ServerSuccess, ScramError> {
        let (mut client, first) = ScramClient::new(credential);
        let (server, server_first) = ScramServer::start(verifier.clone(), first.as_bytes())?;
        let client_final = client.server_first(server_first.as_bytes())?;
        let ok = server.finish(client_final.as_bytes())?;
        client.server_final(ok.server_final.as_bytes())?;
        Ok(ok)
    }

    #[test]
    fn password_exchange_and_pass_through() {
        let v = Verifier::generate("correct horse");
        let ok =
            exchange(&v, Credential::Password("correct horse".into())).expect("right password");
        // The recovered ClientKey logs in again without the password.
        let again = exchange(
            &v,
            Credential::Keys {
                client_key: ok.client_key,
                server_key: v.server_key,
            },
        );
        assert!(again.is_ok());
        assert_eq!(
            exchange(&v, Credential::Password("wrong".into())).unwrap_err(),
            ScramError::BadProof
        );
        let mut other_key = ok.client_key;
        other_key[0] ^= 1;
        assert!(exchange(
            &v,
            Credential::Keys {
                client_key: other_key,
                server_key: v.server_key
            }
        )
        .is_err());
    }

    #[test]
    fn client_detects_a_server_that_does_not_know_the_secret() {
        let v = Verifier::generate("pw");
        let (mut client, first) = ScramClient::new(Credential::Password("pw".into()));
        let (server, server_first) =
            ScramServer::start(v.clone(), first.as_bytes()).expect("start");
        let fin = client.server_first(server_first.as_bytes()).expect("final");
        server.finish(fin.as_bytes()).expect("valid proof");
        assert_eq!(
            client.server_final(b"v=AAAA"),
            Err(ScramError::BadServerSignature)
        );
        assert!(matches!(
            client.server_final(b"e=invalid-proof"),
            Err(ScramError::ServerError(_))
        ));
    }

    #[test]
    fn malformed_client_messages_are_rejected() {
        let v = Verifier::generate("pw");
        for first in [
            &b""[..],
            b"n,,",
            b"x,,n=,r=abc",
            b"p=tls-server-end-point,,n=,r=abc",
            b"n,,n=,r=",
            b"n,,r=abc",
            b"\xff\xfe",
        ] {
            assert!(ScramServer::start(v.clone(), first).is_err(), "{first:?}");
        }
        let (server, sf) = ScramServer::start(v.clone(), b"n,,n=,r=abc").expect("start");
        let nonce = sf.split(',').next().expect("r=").trim_start_matches("r=");
        for fin in [
            format!("c=biws,r={nonce}"),
            format!("c=biws,r={nonce}x,p=AAAA"),
            format!("c=cD10bHM=,r={nonce},p=AAAA"),
            format!("c=biws,r={nonce},p=not-base64!"),
        ] {
            let (s, _) = ScramServer::start(v.clone(), b"n,,n=,r=abc").expect("start");
            assert!(s.finish(fin.as_bytes()).is_err(), "{fin}");
        }
        drop(server);
    }
}
