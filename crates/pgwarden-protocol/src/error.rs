use crate::sqlstate::SqlState;

/// A violation of the wire protocol by the peer. Every variant maps to a SQLSTATE via
/// [`ProtocolError::sqlstate`]; the message is fit to send to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid message length {len}")]
    BadLength { len: i64 },
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("invalid {what}: message ends early")]
    Truncated { what: &'static str },
    #[error("invalid {what}: string is not terminated")]
    Unterminated { what: &'static str },
    #[error("invalid {what}: not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("invalid {what}: {extra} unexpected trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("unexpected message type 0x{0:02x}")]
    UnknownMessage(u8),
}

impl ProtocolError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ProtocolError::UnsupportedProtocol { .. } => SqlState::FEATURE_NOT_SUPPORTED,
            ProtocolError::TooLarge { .. }
            | ProtocolError::BadLength { .. }
            | ProtocolError::Truncated { .. }
            | ProtocolError::Unterminated { .. }
            | ProtocolError::InvalidUtf8 { .. }
            | ProtocolError::TrailingBytes { .. }
            | ProtocolError::Invalid { .. }
            | ProtocolError::UnknownMessage(_) => SqlState::PROTOCOL_VIOLATION,
        }
    }
}
