//! Config errors: one [`FieldError`] per problem, each with the path of the offending field.

use std::fmt;
use std::path::PathBuf;

/// One problem in one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path with indices, e.g. `nodes[1].port`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML, or a whole section has the wrong shape.
    #[error("{0}")]
    Syntax(FieldError),
    /// The TOML is fine but its content is not: every problem found.
    #[error("{}", join_lines(.0))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// Every problem as its own line, for `pgwarden config check`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(errs) => errs.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

fn join_lines(errs: &[FieldError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
