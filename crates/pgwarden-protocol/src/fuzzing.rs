//! Entry points for the fuzz targets in `fuzz/`, also run on generated inputs by the unit tests.
//! Each must never panic on any input; the message target also checks that every frontend
//! message it decodes re-encodes to the same bytes.

use bytes::BytesMut;

use crate::backend::BackendMessage;
use crate::error_response::ErrorFields;
use crate::frame::{decode_message, decode_startup, split, MAX_MESSAGE};
use crate::frontend::{self, FrontendMessage};
use crate::scram::{ScramServer, Verifier};
use crate::startup;

/// A stream of startup packets.
pub fn startup_stream(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(packet)) = decode_startup(&mut buf) {
        if let Ok(startup::StartupPacket::Startup(p)) = startup::parse(&packet) {
            let _ = (p.user(), p.database(), p.protocol_options().count());
        }
    }
}

/// A stream of tagged messages, decoded both as frontend and backend messages.
pub fn message_stream(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decode_message(&mut buf, MAX_MESSAGE) {
        let (tag, body) = split(&frame);
        if let Ok(msg) = FrontendMessage::parse(tag, body) {
            if let Some(again) = reencode(&msg) {
                assert_eq!(&again[..], &frame[..], "{msg:?} does not round-trip");
            }
        }
        if let Ok(BackendMessage::ErrorResponse(e) | BackendMessage::NoticeResponse(e)) =
            BackendMessage::parse(tag, body)
        {
            let _ = (e.code(), e.message(), e.iter().count());
        }
        let _ = frontend::parse_sasl_initial(body);
        let _ = ErrorFields::parse(body);
    }
}

fn reencode(msg: &FrontendMessage<'_>) -> Option<BytesMut> {
    let mut b = BytesMut::new();
    match *msg {
        FrontendMessage::Query(q) => frontend::put_query(&mut b, q),
        FrontendMessage::Parse {
            name,
            query,
            param_types,
        } => frontend::put_parse(&mut b, name, query, param_types),
        FrontendMessage::Bind(ref bind) => {
            frontend::put_bind(&mut b, bind.portal, bind.statement, bind.rest)
        }
        FrontendMessage::Describe { target, name } => frontend::put_describe(&mut b, target, name),
        FrontendMessage::Execute { portal, max_rows } => {
            frontend::put_execute(&mut b, portal, max_rows)
        }
        FrontendMessage::Close { target, name } => frontend::put_close(&mut b, target, name),
        FrontendMessage::Sync => frontend::put_sync(&mut b),
        FrontendMessage::Flush => frontend::put_flush(&mut b),
        FrontendMessage::Terminate => frontend::put_terminate(&mut b),
        _ => return None,
    }
    Some(b)
}

/// A SCRAM exchange driven by arbitrary client messages (split at the first 0xff byte).
pub fn scram_server(data: &[u8]) {
    let (first, fin) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let verifier = Verifier::from_password("pw", b"fuzzsaltfuzzsalt", 1);
    if let Ok((server, _)) = ScramServer::start(verifier, first) {
        let _ = server.finish(fin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::Target;

    /// xorshift: deterministic, so a failure reproduces.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn valid_stream() -> Vec<u8> {
        let mut b = BytesMut::new();
        frontend::put_query(&mut b, "SELECT 1; SELECT 2");
        frontend::put_parse(&mut b, "s", b"SELECT $1::int", &[0, 1, 0, 0, 0, 23]);
        frontend::put_bind(&mut b, "", "s", &[0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 0]);
        frontend::put_describe(&mut b, Target::Portal, "");
        frontend::put_execute(&mut b, "", 0);
        frontend::put_close(&mut b, Target::Statement, "s");
        frontend::put_sync(&mut b);
        b.to_vec()
    }

    #[test]
    fn mutated_and_random_inputs_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let base = valid_stream();
        let mut startup = BytesMut::new();
        startup::put_startup(&mut startup, &[("user", "u"), ("database", "d")]);
        for _ in 0..20_000 {
            let mut m = if rng.below(2) == 0 {
                base.clone()
            } else {
                startup.to_vec()
            };
            for _ in 0..=rng.below(4) {
                let i = rng.below(m.len());
                match rng.below(3) {
                    0 => m[i] ^= 1 << rng.below(8),
                    1 => m[i] = rng.next() as u8,
                    _ => m.truncate(i),
                }
                if m.is_empty() {
                    break;
                }
            }
            message_stream(&m);
            startup_stream(&m);
            scram_server(&m);
        }
        for _ in 0..5_000 {
            let len = rng.below(64);
            let r: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            message_stream(&r);
            startup_stream(&r);
            scram_server(&r);
        }
    }

    #[test]
    fn a_valid_stream_round_trips() {
        message_stream(&valid_stream());
    }
}
