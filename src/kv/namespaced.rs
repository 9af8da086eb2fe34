//! Environment namespaces: `production:` and `preview:` deployments sharing
//! one store never see each other's keys.

use std::sync::Arc;

use bytes::Bytes;

use super::{KeyInfo, Kv, KvEntry, KvError, KvFuture, ListPage, PutItem, PutOptions};

/// Prefixes every key with `"{namespace}:"` on the way in and strips it from
/// listed keys and cursors on the way out.
pub(crate) struct Namespaced {
    inner: Arc<dyn Kv>,
    prefix: String,
}

impl Namespaced {
    /// `namespace` must be non-empty and free of `:` so that one namespace can
    /// never be a prefix of another's keys.
    pub(crate) fn new(inner: Arc<dyn Kv>, namespace: &str) -> Result<Self, KvError> {
        if namespace.is_empty() || namespace.contains(':') {
            return Err(KvError::InvalidArgument(format!(
                "namespace {namespace:?} must be non-empty and must not contain ':'"
            )));
        }
        Ok(Namespaced {
            inner,
            prefix: format!("{namespace}:"),
        })
    }

    /// `"{namespace}:"`, what every key of the namespace starts with (for a
    /// caller that builds full keys itself and reads the store under this).
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.prefix[..self.prefix.len() - 1]
    }

    fn full(&self, key: &str) -> String {
        let mut full = String::with_capacity(self.prefix.len() + key.len());
        full.push_str(&self.prefix);
        full.push_str(key);
        full
    }
}

impl Kv for Namespaced {
    fn get<'a>(&'a self, key: &'a str) -> KvFuture<'a, Option<KvEntry>> {
        Box::pin(async move {
            // Checked here too: an empty key must not address the bare prefix.
            super::check_key(key)?;
            self.inner.get(&self.full(key)).await
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Bytes, opts: PutOptions) -> KvFuture<'a, ()> {
        Box::pin(async move {
            super::check_key(key)?;
            self.inner.put(&self.full(key), value, opts).await
        })
    }

    fn put_batch<'a>(&'a self, items: Vec<PutItem>) -> KvFuture<'a, ()> {
        Box::pin(async move {
            let mut full = Vec::with_capacity(items.len());
            for item in items {
                super::check_key(&item.key)?;
                full.push(PutItem {
                    key: self.full(&item.key),
                    ..item
                });
            }
            self.inner.put_batch(full).await
        })
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        opts: PutOptions,
    ) -> KvFuture<'a, bool> {
        Box::pin(async move {
            super::check_key(key)?;
            self.inner.put_if_absent(&self.full(key), value, opts).await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> KvFuture<'a, bool> {
        Box::pin(async move {
            super::check_key(key)?;
            self.inner.delete(&self.full(key)).await
        })
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.changes()
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> KvFuture<'a, ListPage> {
        Box::pin(async move {
            let full_cursor = cursor.map(|c| self.full(c));
            let page = self
                .inner
                .list(&self.full(prefix), full_cursor.as_deref(), limit)
                .await?;
            let strip = |name: String| -> Result<String, KvError> {
                name.strip_prefix(&self.prefix)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        KvError::Backend(format!("listed key {name:?} is outside the namespace"))
                    })
            };
            let keys = page
                .keys
                .into_iter()
                .map(|k| {
                    Ok(KeyInfo {
                        name: strip(k.name)?,
                        metadata: k.metadata,
                        expires_at: k.expires_at,
                    })
                })
                .collect::<Result<Vec<_>, KvError>>()?;
            let cursor = page.cursor.map(strip).transpose()?;
            Ok(ListPage { keys, cursor })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{conformance, MemoryKv};

    fn wrapped() -> (Arc<MemoryKv>, Namespaced) {
        let store = Arc::new(MemoryKv::new());
        let ns = Namespaced::new(store.clone(), "preview").unwrap();
        (store, ns)
    }

    #[tokio::test]
    async fn behaves_like_a_store() {
        conformance::put_get_delete(&wrapped().1).await;
        conformance::metadata_round_trips(&wrapped().1).await;
        conformance::ttl_expiry(&wrapped().1).await;
        conformance::get_many(&wrapped().1).await;
        conformance::list_prefix_and_cursor(&wrapped().1).await;
        conformance::refusals(&wrapped().1).await;
        conformance::put_batch(&wrapped().1).await;
        conformance::put_if_absent(&wrapped().1).await;
    }

    #[tokio::test]
    async fn environments_do_not_see_each_other() {
        let store: Arc<dyn Kv> = Arc::new(MemoryKv::new());
        let production = Namespaced::new(store.clone(), "production").unwrap();
        let preview = Namespaced::new(store.clone(), "preview").unwrap();
        production
            .put(
                "flag:newUI:user:1",
                Bytes::from_static(b"true"),
                PutOptions::default(),
            )
            .await
            .unwrap();
        preview
            .put(
                "flag:newUI:user:1",
                Bytes::from_static(b"false"),
                PutOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(
            production
                .get("flag:newUI:user:1")
                .await
                .unwrap()
                .unwrap()
                .value,
            "true"
        );
        assert_eq!(
            preview
                .get("flag:newUI:user:1")
                .await
                .unwrap()
                .unwrap()
                .value,
            "false"
        );
        // The raw store holds both, each under its namespace.
        assert!(store
            .get("production:flag:newUI:user:1")
            .await
            .unwrap()
            .is_some());

        let listed = preview.list("", None, 10).await.unwrap();
        assert_eq!(listed.keys.len(), 1);
        assert_eq!(listed.keys[0].name, "flag:newUI:user:1");
        assert!(preview.delete("flag:newUI:user:1").await.unwrap());
        assert!(production.get("flag:newUI:user:1").await.unwrap().is_some());
    }

    #[test]
    fn rejects_ambiguous_namespaces() {
        let store: Arc<dyn Kv> = Arc::new(MemoryKv::new());
        assert!(Namespaced::new(store.clone(), "").is_err());
        assert!(Namespaced::new(store.clone(), "prod:eu").is_err());
        assert_eq!(
            Namespaced::new(store, "preview").unwrap().namespace(),
            "preview"
        );
    }
}
