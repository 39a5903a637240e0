//! The PostgreSQL v3 wire protocol: a pure codec, SQLSTATE constants, and the SCRAM-SHA-256 and
//! md5 authentication exchanges.
//!
//! Decoding is incremental: [`frame::decode_startup`] and [`frame::decode_message`] return
//! `Ok(None)` until a whole frame is buffered, check the claimed length against a limit *before*
//! waiting for (or allocating) the body, and hand back the frame as [`bytes::Bytes`] split off the
//! read buffer, so forwarding never copies or re-encodes it. Typed views ([`frontend`],
//! [`backend`], [`startup`]) borrow from a frame and decode only what a decision needs.
//!
//! No I/O, no logging, no config, no globals.
//!
//! # Layout
//! - [`frame`] — splitting a byte stream into startup packets and tagged messages, with limits.
//! - [`cursor`] — reading integers and C strings from a frame body.
//! - [`startup`] — the first packet: StartupMessage, SSLRequest, GSSENCRequest, CancelRequest.
//! - [`frontend`] — client messages: decoding, and encoding the ones the proxy rewrites.
//! - [`backend`] — server messages: decoding the ones the proxy looks at, encoding the ones it makes.
//! - [`error_response`] — ErrorResponse/NoticeResponse fields, building and reading them.
//! - [`sqlstate`] — [`SqlState`] constants.
//! - [`scram`] — SCRAM-SHA-256 server and client, including client-key pass-through.
//! - [`md5`] — md5 password hashing.
//! - [`error`] — [`ProtocolError`].
//! - `fuzzing` — entry points shared by the fuzz targets in `fuzz/` and the randomized tests.

pub mod backend;
pub mod cursor;
pub mod error;
pub mod error_response;
pub mod frame;
pub mod frontend;
#[doc(hidden)]
pub mod fuzzing;
pub mod md5;
pub mod scram;
pub mod sqlstate;
pub mod startup;

pub use error::ProtocolError;
pub use sqlstate::SqlState;
