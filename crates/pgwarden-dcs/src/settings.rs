//! `config`: the cluster's dynamic settings (`pgwarden edit-config`), a TOML text the agents
//! apply over their file's config. The store keeps the text; validating it is the writer's
//! job (pgwarden-config's `dynamic::apply`), and each agent checks it again before applying.

use crate::cluster::ClusterStore;
use crate::kv::{Compare, Kv, Op, Revision};
use crate::requests::Stored;
use crate::DcsError;

impl<K: Kv> ClusterStore<K> {
    /// The dynamic settings, if any were written.
    pub async fn dynamic_config(&self) -> Result<Option<Stored<String>>, DcsError> {
        match self.kv().get(&self.key("config")).await? {
            Some(e) => Ok(Some(Stored {
                value: Self::parse(&e)?,
                revision: e.mod_revision,
            })),
            None => Ok(None),
        }
    }

    /// Replaces the dynamic settings if the key is still at `revision` (0: absent): two
    /// editors never overwrite each other unseen. An empty text deletes the key.
    pub async fn put_dynamic_config(
        &self,
        text: &str,
        revision: Revision,
    ) -> Result<bool, DcsError> {
        let key = self.key("config");
        let op = if text.trim().is_empty() {
            Op::Delete { key: key.clone() }
        } else {
            Op::Put {
                key: key.clone(),
                value: self.encode("config", &text)?,
                lease: None,
            }
        };
        self.kv()
            .txn(
                vec![Compare {
                    key,
                    mod_revision: revision,
                }],
                vec![op],
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use crate::cluster::ClusterStore;
    use crate::memory::MemoryKv;

    #[tokio::test(start_paused = true)]
    async fn dynamic_settings_are_replaced_by_revision_and_read_with_the_cluster() {
        let s = ClusterStore::new(MemoryKv::new(), "pgwarden", "main");
        assert_eq!(s.dynamic_config().await.expect("read"), None);
        assert!(s
            .put_dynamic_config("[agent]\nrejoin = \"clone\"\n", 0)
            .await
            .expect("txn"));
        let first = s.dynamic_config().await.expect("read").expect("there");
        assert!(
            !s.put_dynamic_config("[agent]\n", 0).await.expect("txn"),
            "not unseen"
        );
        let snap = s.snapshot::<serde_json::Value>().await.expect("snapshot");
        assert_eq!(
            snap.dynamic.as_ref().map(|d| d.value.as_str()),
            Some("[agent]\nrejoin = \"clone\"\n")
        );
        assert!(
            s.put_dynamic_config("", first.revision).await.expect("txn"),
            "emptied"
        );
        assert_eq!(s.dynamic_config().await.expect("read"), None);
    }
}
