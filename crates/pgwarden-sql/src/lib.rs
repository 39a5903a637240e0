//! SQL text as the proxy needs to understand it: where statements begin and end, and what a
//! statement does to the session (settings, state that ties a client to one server connection).
//!
//! Owns lexing and classification; holds no connections and does no I/O. The lexer follows
//! PostgreSQL's rules for what is code and what is not (quoted strings and identifiers, `E''`
//! escapes, dollar quotes, nested block comments) so that a `;` or a keyword inside a string is
//! never mistaken for one in code.
//!
//! # Layout
//! - [`lex`] — tokens, and [`split`]: a multi-statement query string into its statements.
//! - [`route`] — [`route::classify`]: whether a statement may run on a hot standby.
//! - [`grammar`] — PostgreSQL's parser, for the queries the lexer cannot decide surely.
//! - [`session`] — [`session::classify`]: a statement's [`Effect`] on session state.

pub mod grammar;
pub mod lex;
pub mod route;
pub mod session;

pub use lex::split;
pub use session::{classify, classify_bytes, classify_query, classify_query_bytes, Effect, Pin};
