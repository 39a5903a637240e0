//! SQLSTATE codes as typed constants (never string literals at call sites).

use std::fmt;

/// A five-character SQLSTATE.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState([u8; 5]);

macro_rules! states {
    ($($name:ident = $code:literal;)*) => {
        impl SqlState {
            $(pub const $name: SqlState = SqlState(*$code);)*
        }
    };
}

states! {
    SUCCESSFUL_COMPLETION = b"00000";
    WARNING = b"01000";
    CONNECTION_EXCEPTION = b"08000";
    SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION = b"08001";
    SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION = b"08004";
    CONNECTION_FAILURE = b"08006";
    PROTOCOL_VIOLATION = b"08P01";
    FEATURE_NOT_SUPPORTED = b"0A000";
    INVALID_TRANSACTION_STATE = b"25000";
    ACTIVE_SQL_TRANSACTION = b"25001";
    IN_FAILED_SQL_TRANSACTION = b"25P02";
    IDLE_IN_TRANSACTION_SESSION_TIMEOUT = b"25P03";
    INVALID_SQL_STATEMENT_NAME = b"26000";
    INVALID_AUTHORIZATION_SPECIFICATION = b"28000";
    INVALID_PASSWORD = b"28P01";
    INVALID_CATALOG_NAME = b"3D000";
    INVALID_CURSOR_NAME = b"34000";
    SYNTAX_ERROR = b"42601";
    NAME_TOO_LONG = b"42622";
    UNDEFINED_OBJECT = b"42704";
    DUPLICATE_PREPARED_STATEMENT = b"42P05";
    DUPLICATE_CURSOR = b"42P03";
    TOO_MANY_CONNECTIONS = b"53300";
    CONFIGURATION_LIMIT_EXCEEDED = b"53400";
    OPERATOR_INTERVENTION = b"57000";
    QUERY_CANCELED = b"57014";
    ADMIN_SHUTDOWN = b"57P01";
    CRASH_SHUTDOWN = b"57P02";
    CANNOT_CONNECT_NOW = b"57P03";
    INVALID_PARAMETER_VALUE = b"22023";
    READ_ONLY_SQL_TRANSACTION = b"25006";
    CONFIG_FILE_ERROR = b"F0000";
    INTERNAL_ERROR = b"XX000";
}

impl SqlState {
    /// A code received from a server; `None` unless it is five ASCII letters or digits.
    pub fn from_bytes(b: &[u8]) -> Option<SqlState> {
        let code: [u8; 5] = b.try_into().ok()?;
        code.iter()
            .all(u8::is_ascii_alphanumeric)
            .then_some(SqlState(code))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("SqlState holds ASCII only")
    }
}

impl fmt::Debug for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SqlState({})", self.as_str())
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(SqlState::PROTOCOL_VIOLATION.as_str(), "08P01");
        assert_eq!(
            SqlState::from_bytes(b"28P01"),
            Some(SqlState::INVALID_PASSWORD)
        );
        assert_eq!(SqlState::from_bytes(b"28P0"), None);
        assert_eq!(SqlState::from_bytes(b"28P0\0"), None);
    }
}
