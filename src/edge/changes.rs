//! Live changes to flags, segments and experiments (admin API), each
//! validated, stored (see [`super::store`]) and audited; aliasing an
//! anonymous id to a user; experiment results from the stored exposures
//! and conversions.

use bytes::Bytes;
use serde_json::{json, Value};

use super::operations::check_user as check_user_id;
use super::operations::EdgeAdminError;
use super::stats;
use super::store::{StoreError, AUDIT_PREFIX};
use super::Edge;
use crate::config::edge::Definitions;
use crate::kv::{Kv, PutOptions};

/// What kind of definition a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DefKind {
    Flag,
    Segment,
    Experiment,
}

impl DefKind {
    fn as_str(self) -> &'static str {
        match self {
            DefKind::Flag => "flag",
            DefKind::Segment => "segment",
            DefKind::Experiment => "experiment",
        }
    }

    fn get(self, doc: &Definitions, name: &str) -> Option<Value> {
        let v = match self {
            DefKind::Flag => doc.flags.get(name).map(serde_json::to_value),
            DefKind::Segment => doc.segments.get(name).map(serde_json::to_value),
            DefKind::Experiment => doc.experiments.get(name).map(serde_json::to_value),
        };
        v.and_then(Result::ok)
    }

    fn list(self, doc: &Definitions) -> Value {
        let v = match self {
            DefKind::Flag => serde_json::to_value(&doc.flags),
            DefKind::Segment => serde_json::to_value(&doc.segments),
            DefKind::Experiment => serde_json::to_value(&doc.experiments),
        };
        v.unwrap_or(Value::Null)
    }

    /// Puts (`Some`) or removes (`None`) one definition; a body that is not
    /// the definition's shape is a 400 naming the problem.
    fn set(
        self,
        doc: &mut Definitions,
        name: &str,
        value: Option<Value>,
    ) -> Result<(), EdgeAdminError> {
        let bad = |e: serde_json::Error| {
            EdgeAdminError::BadRequest(format!("{}s.{name}: {e}", self.as_str()))
        };
        let name = name.to_owned();
        match (self, value) {
            (DefKind::Flag, Some(v)) => {
                doc.flags
                    .insert(name, serde_json::from_value(v).map_err(bad)?);
            }
            (DefKind::Segment, Some(v)) => {
                doc.segments
                    .insert(name, serde_json::from_value(v).map_err(bad)?);
            }
            (DefKind::Experiment, Some(v)) => {
                doc.experiments
                    .insert(name, serde_json::from_value(v).map_err(bad)?);
            }
            (DefKind::Flag, None) => {
                doc.flags.remove(&name);
            }
            (DefKind::Segment, None) => {
                doc.segments.remove(&name);
            }
            (DefKind::Experiment, None) => {
                doc.experiments.remove(&name);
            }
        }
        Ok(())
    }
}

/// A change asked for through the admin API.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// Create or replace.
    Put(Value),
    /// JSON merge patch (RFC 7396) over the current definition.
    Patch(Value),
    Delete,
}

/// RFC 7396: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(map) = target {
        for (k, v) in patch {
            if v.is_null() {
                map.remove(k);
            } else {
                merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

impl From<StoreError> for EdgeAdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Kv(k) => k.into(),
            other => EdgeAdminError::Unavailable(other.to_string()),
        }
    }
}

impl Edge {
    /// Every definition of a kind.
    pub(crate) async fn list_definitions(&self, kind: DefKind) -> Value {
        self.defs.ensure_loaded().await;
        let defs = self.defs.current.load();
        json!({ format!("{}s", kind.as_str()): kind.list(&defs.doc) })
    }

    pub(crate) async fn get_definition(
        &self,
        kind: DefKind,
        name: &str,
    ) -> Result<Value, EdgeAdminError> {
        self.defs.ensure_loaded().await;
        let defs = self.defs.current.load();
        kind.get(&defs.doc, name)
            .ok_or_else(|| EdgeAdminError::NotFound(format!("no {} named {name:?}", kind.as_str())))
    }

    /// Applies one change: read the stored document, change it, validate
    /// the whole (a bad change is a 400 and nothing is written), store it
    /// with a new version, and append an audit record naming `actor`.
    pub(crate) async fn change_definition(
        &self,
        kind: DefKind,
        name: &str,
        change: Change,
        actor: &str,
    ) -> Result<Value, EdgeAdminError> {
        self.defs.ensure_loaded().await;
        let _serialized = self.defs.changes.lock().await;
        let mut doc = match self.defs.read_doc().await? {
            Some(doc) => doc,
            None => self.defs.current.load().doc.clone(),
        };
        let before = kind.get(&doc, name);
        let (action, after) = match change {
            Change::Put(v) => ("put", Some(v)),
            Change::Patch(patch) => {
                let mut current = before.clone().ok_or_else(|| {
                    EdgeAdminError::NotFound(format!("no {} named {name:?}", kind.as_str()))
                })?;
                merge_patch(&mut current, &patch);
                ("patch", Some(current))
            }
            Change::Delete => {
                if before.is_none() {
                    return Err(EdgeAdminError::NotFound(format!(
                        "no {} named {name:?}",
                        kind.as_str()
                    )));
                }
                ("delete", None)
            }
        };
        kind.set(&mut doc, name, after)?;
        let compiled = self
            .defs
            .compile(doc)
            .map_err(|e| EdgeAdminError::BadRequest(e.to_string()))?;
        let after = kind.get(&compiled.doc, name);
        self.defs.write_doc(compiled).await?;

        let at_ms = crate::kv::now_ms();
        let record = json!({
            "at_ms": at_ms,
            "actor": actor,
            "kind": kind.as_str(),
            "name": name,
            "action": action,
            "before": before,
            "after": after,
        });
        let mut rand = [0u8; 4];
        let _ = getrandom::getrandom(&mut rand);
        let key = format!("{AUDIT_PREFIX}{at_ms:013}:{:08x}", u32::from_be_bytes(rand));
        let encoded =
            serde_json::to_vec(&record).map_err(|e| EdgeAdminError::Unavailable(e.to_string()))?;
        self.kv
            .put(&key, Bytes::from(encoded), PutOptions::default())
            .await?;
        tracing::info!(target: "kvgate::admin", kind = kind.as_str(), name, action, actor, "edge definition changed");
        Ok(
            json!({ "kind": kind.as_str(), "name": name, "action": action, "before": record["before"], "after": record["after"] }),
        )
    }

    /// Audit records, oldest first, `limit` (at most 1000) after `cursor`.
    pub(crate) async fn audit(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Value, EdgeAdminError> {
        let page = self
            .kv
            .list(AUDIT_PREFIX, cursor, limit.clamp(1, 1000))
            .await?;
        let names: Vec<&str> = page.keys.iter().map(|k| k.name.as_str()).collect();
        let mut entries = Vec::with_capacity(page.keys.len());
        for read in self.kv.get_many(&names).await? {
            if let Some(entry) = read? {
                entries.push(serde_json::from_slice::<Value>(&entry.value).unwrap_or(Value::Null));
            }
        }
        Ok(json!({ "entries": entries, "next_cursor": page.cursor }))
    }

    /// Carries an anonymous id's experiment assignments over to `user_id`
    /// (where the user has none yet), as after a login.
    pub(crate) async fn alias(
        &self,
        anonymous_id: &str,
        user_id: &str,
    ) -> Result<Value, EdgeAdminError> {
        check_user_id(anonymous_id)?;
        check_user_id(user_id)?;
        if !super::identity::is_anonymous_id(anonymous_id)
            || super::identity::is_anonymous_id(user_id)
        {
            return Err(EdgeAdminError::BadRequest(
                "alias an anonymous id (anon:...) to an authenticated user id".into(),
            ));
        }
        self.defs.ensure_loaded().await;
        let defs = self.defs.current.load_full();
        let mut copied = serde_json::Map::new();
        for exp in &defs.experiments {
            let Some(from) = self.kv.get(&exp.sticky_key(anonymous_id)).await? else {
                continue;
            };
            let key = exp.sticky_key(user_id);
            if self.kv.get(&key).await?.is_some() || exp.variant(&from.value).is_none() {
                continue;
            }
            self.kv
                .put(&key, from.value.clone(), PutOptions::ttl(self.sticky_ttl))
                .await?;
            copied.insert(
                exp.name.clone(),
                String::from_utf8_lossy(&from.value).into(),
            );
        }
        Ok(json!({ "anonymous_id": anonymous_id, "user_id": user_id, "copied": copied }))
    }

    /// Users exposed and converted per variant (from the state store, so
    /// every instance's traffic counts), each rate with its Wilson interval,
    /// and each variant against control: difference with its interval,
    /// two-sided two-proportion z-test, and a plain statement.
    pub(crate) async fn results(&self, name: &str) -> Result<Value, EdgeAdminError> {
        self.defs.ensure_loaded().await;
        let defs = self.defs.current.load_full();
        let exp = Self::experiment(&defs, name)?;
        let mut counts = Vec::with_capacity(exp.variants.len());
        for variant in &exp.variants {
            let prefix = format!("exposed:{}:{}:", exp.key_name, variant.name);
            let (mut users, mut conversions) = (0u64, 0u64);
            let mut cursor: Option<String> = None;
            loop {
                let page = self.kv.list(&prefix, cursor.as_deref(), 1000).await?;
                let converted: Vec<String> = page
                    .keys
                    .iter()
                    .filter_map(|k| k.name.strip_prefix(&prefix))
                    .map(|user| super::converted_key(exp, user))
                    .collect();
                users += converted.len() as u64;
                let keys: Vec<&str> = converted.iter().map(String::as_str).collect();
                for read in self.kv.get_many(&keys).await? {
                    if read?.is_some() {
                        conversions += 1;
                    }
                }
                match page.cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            counts.push((users, conversions));
        }
        let alpha = exp.alpha;
        let (cu, cc) = counts[exp.control];
        let control_name = &exp.variants[exp.control].name;
        let mut variants = Vec::with_capacity(counts.len());
        let mut statements = Vec::new();
        for (variant, &(users, conversions)) in exp.variants.iter().zip(&counts) {
            let rate = if users == 0 {
                0.0
            } else {
                conversions as f64 / users as f64
            };
            let (lo, hi) = stats::wilson_interval(conversions, users, alpha);
            let mut v = json!({
                "name": variant.name,
                "users": users,
                "conversions": conversions,
                "rate": rate,
                "rate_interval": [lo, hi],
            });
            if variant.name != *control_name {
                let cmp = stats::compare(cc, cu, conversions, users, alpha);
                let p = |c: &stats::Comparison| {
                    if c.p_value < 1e-4 {
                        "p < 0.0001".to_owned()
                    } else {
                        format!("p = {:.4}", c.p_value)
                    }
                };
                let statement = match &cmp {
                    None => format!("{}: not enough data to compare with {control_name}", variant.name),
                    Some(c) if c.significant => format!(
                        "{} converts {} than {control_name} ({:+.2} percentage points, {}): significant at the {} level",
                        variant.name,
                        if c.difference > 0.0 { "better" } else { "worse" },
                        c.difference * 100.0,
                        p(c),
                        alpha
                    ),
                    Some(c) => format!(
                        "{} vs {control_name}: {:+.2} percentage points, {}: not significant at the {} level",
                        variant.name,
                        c.difference * 100.0,
                        p(c),
                        alpha
                    ),
                };
                v["vs_control"] = match cmp {
                    Some(c) => json!({
                        "difference": c.difference,
                        "difference_interval": [c.interval.0, c.interval.1],
                        "z": c.z,
                        "p_value": c.p_value,
                        "significant": c.significant,
                    }),
                    None => Value::Null,
                };
                statements.push(statement);
            }
            variants.push(v);
        }
        let today = crate::kv::now_ms() / 86_400_000;
        let daily: Vec<Value> = self
            .outcomes
            .daily
            .rows(&exp.key_name, today)
            .into_iter()
            .map(|(day, variant, exposures, conversions)| {
                json!({
                    "date": super::exposures::utc_date(day),
                    "variant": variant,
                    "exposures": exposures,
                    "conversions": conversions,
                })
            })
            .collect();
        Ok(json!({
            "experiment": exp.name,
            "status": exp.status,
            "winner": exp.winner.and_then(|w| exp.variants.get(w)).map(|v| v.name.as_str()),
            "bucket_version": exp.bucket_version,
            "control": control_name,
            "alpha": alpha,
            "confidence": 1.0 - alpha,
            "test": "two-sided two-proportion z-test; Wilson score intervals",
            "variants": variants,
            "summary": statements,
            // Users first exposed / converted per UTC day (deduplicated per
            // day; this instance's traffic), the last 30 days.
            "daily": daily,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
        let mut doc = json!({"rules": [1, 2]});
        merge_patch(&mut doc, &json!({"rules": [3]}));
        assert_eq!(doc, json!({"rules": [3]}));
    }
}
