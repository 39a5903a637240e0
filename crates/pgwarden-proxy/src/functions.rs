//! What the catalog says of function names, per (database, user) group: whether some function
//! of the name is `VOLATILE` (`pg_proc.provolatile`, any schema, any overload). Asked once per
//! name, on the primary connection that serves the statement that first calls it; forgotten on
//! `RELOAD` and when a statement seen by the router creates, alters or drops a function.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use pgwarden_sql::route::Volatility;

use crate::error::ProxyError;
use crate::server::{query_rows, ServerConn};

/// Names remembered at most; past it, the cache starts over.
const MAX_NAMES: usize = 10_000;
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Functions {
    by_name: RwLock<HashMap<String, Volatility>>,
}

impl Functions {
    pub fn get(&self, name: &str) -> Option<Volatility> {
        self.by_name
            .read()
            .expect("functions lock")
            .get(name)
            .copied()
    }

    pub fn clear(&self) {
        self.by_name.write().expect("functions lock").clear();
    }

    pub fn len(&self) -> usize {
        self.by_name.read().expect("functions lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks the catalog on `conn` (idle, between transactions) about `names` and remembers the
    /// answers: a name no function has is not volatile (a call of it fails on every node alike).
    pub async fn look_up(&self, conn: &mut ServerConn, names: &[String]) -> Result<(), ProxyError> {
        let array = format!(
            "{{{}}}",
            names
                .iter()
                .map(|n| format!("\"{}\"", n.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect::<Vec<_>>()
                .join(",")
        );
        let rows = query_rows(
            conn,
            "SELECT proname::text, bool_or(provolatile = 'v')::text FROM pg_catalog.pg_proc \
             WHERE proname = ANY ($1::text[]) GROUP BY proname",
            &[&array],
            LOOKUP_TIMEOUT,
        )
        .await?;
        let rows = match rows {
            Ok(rows) => rows,
            Err((code, message)) => {
                tracing::warn!(%code, %message, "function volatility lookup failed; such calls go to the primary");
                return Ok(());
            }
        };
        let mut map = self.by_name.write().expect("functions lock");
        if map.len() + names.len() > MAX_NAMES {
            map.clear();
        }
        for n in names {
            map.insert(n.clone(), Volatility::NotVolatile);
        }
        for row in rows {
            if let [Some(name), Some(volatile)] = row.as_slice() {
                if volatile == "true" {
                    map.insert(name.clone(), Volatility::Volatile);
                }
            }
        }
        Ok(())
    }
}
