//! A stopped data directory's control file, as `pg_controldata` prints it.

use std::time::Duration;

use pgwarden_core::Lsn;

use crate::error::PgError;
use crate::exec;
use crate::instance::Instance;

const CONTROLDATA_TIMEOUT: Duration = Duration::from_secs(10);

/// What the control file says of how the server last stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    /// `Database cluster state: shut down`: a primary that stopped cleanly (a standby's is
    /// `shut down in recovery`).
    pub shut_down: bool,
    /// The latest checkpoint's location: for a clean shutdown, the shutdown checkpoint, the
    /// last record it wrote.
    pub checkpoint: Lsn,
    pub timeline: u32,
}

impl ControlData {
    /// From `pg_controldata`'s output (run with `LC_ALL=C`).
    pub fn parse(text: &str) -> Option<ControlData> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        Some(ControlData {
            shut_down: field("Database cluster state")? == "shut down",
            checkpoint: field("Latest checkpoint location")?.parse().ok()?,
            timeline: field("Latest checkpoint's TimeLineID")?.parse().ok()?,
        })
    }
}

impl Instance {
    /// The control file of this (stopped) data directory.
    pub async fn control_data(&self) -> Result<ControlData, PgError> {
        let data = self.data_dir.to_string_lossy().into_owned();
        let program = self.env().bins.program("pg_controldata");
        let out = exec::run(
            &program,
            &["-D", &data],
            &[],
            self.env().run_as,
            CONTROLDATA_TIMEOUT,
        )
        .await?;
        ControlData::parse(&out).ok_or_else(|| PgError::Command {
            program: "pg_controldata".into(),
            status: "exit status: 0".into(),
            stderr: format!("unexpected output: {}", exec::last_lines(&out, 3)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_shutdown_and_others() {
        let clean = "pg_control version number:            1300\n\
                     Database cluster state:               shut down\n\
                     Latest checkpoint location:           0/3000028\n\
                     Latest checkpoint's REDO location:    0/3000028\n\
                     Latest checkpoint's TimeLineID:       2\n";
        assert_eq!(
            ControlData::parse(clean),
            Some(ControlData {
                shut_down: true,
                checkpoint: "0/3000028".parse().expect("lsn"),
                timeline: 2,
            })
        );
        let crashed = clean.replace("shut down", "in production");
        assert_eq!(
            ControlData::parse(&crashed).map(|c| c.shut_down),
            Some(false)
        );
        let standby = clean.replace("shut down", "shut down in recovery");
        assert_eq!(
            ControlData::parse(&standby).map(|c| c.shut_down),
            Some(false)
        );
        assert_eq!(ControlData::parse("garbage"), None);
    }
}
