//! Operations on edge state (users, overrides, experiments, counters), as
//! plain async methods returning JSON; the admin listener (`src/admin`)
//! routes to them: `GET /users/{id}`, `PUT`/`DELETE /flags/{flag}/users/{id}`,
//! `GET`/`PATCH /users/{id}/preferences`, `GET /experiments/{name}`,
//! `DELETE /experiments/{name}/users/{id}`, `GET /counters`.

use bytes::Bytes;
use http::StatusCode;
use serde_json::{json, Map, Value};

use super::definitions::{Compiled, ExperimentRuntime, FlagRuntime};
use super::targeting::RequestAttributes;
use super::{flag_key, prefs, prefs_key, unix_seconds, Edge, FlagValue};
use crate::kv::{Kv, KvError, PutOptions};

/// A refused admin operation; [`EdgeAdminError::status`] is the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EdgeAdminError {
    /// The user, flag or experiment named does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request's value or document is invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// The state store failed (503).
    #[error("state store unavailable: {0}")]
    Unavailable(String),
}

impl EdgeAdminError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            EdgeAdminError::NotFound(_) => StatusCode::NOT_FOUND,
            EdgeAdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            EdgeAdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The response body: `{"error": "<message>"}`.
    pub(crate) fn body(&self) -> Value {
        json!({ "error": self.to_string() })
    }
}

impl From<KvError> for EdgeAdminError {
    fn from(err: KvError) -> Self {
        match err {
            KvError::InvalidKey(m) | KvError::InvalidArgument(m) => EdgeAdminError::BadRequest(m),
            other => EdgeAdminError::Unavailable(other.to_string()),
        }
    }
}

pub(super) fn check_user(user_id: &str) -> Result<(), EdgeAdminError> {
    if super::is_valid_user_id(user_id) {
        Ok(())
    } else {
        Err(EdgeAdminError::BadRequest(format!(
            "user id must be 1 to {} visible ASCII characters",
            super::MAX_USER_ID_BYTES
        )))
    }
}

impl Edge {
    fn flag<'d>(defs: &'d Compiled, name: &str) -> Result<&'d FlagRuntime, EdgeAdminError> {
        defs.flag(name)
            .ok_or_else(|| EdgeAdminError::NotFound(format!("no flag named {name:?}")))
    }

    pub(super) fn experiment<'d>(
        defs: &'d Compiled,
        name: &str,
    ) -> Result<&'d ExperimentRuntime, EdgeAdminError> {
        defs.experiment(name)
            .ok_or_else(|| EdgeAdminError::NotFound(format!("no experiment named {name:?}")))
    }

    async fn stored_preferences(&self, user_id: &str) -> Result<prefs::Document, EdgeAdminError> {
        match self.kv.get(&prefs_key(user_id)).await? {
            None => Ok(prefs::Document::new()),
            Some(entry) => Self::stored_prefs(&entry).map_err(EdgeAdminError::Unavailable),
        }
    }

    /// What a user gets: every flag's value and its source, the headers the
    /// origin would receive, each experiment's stored assignment and the
    /// variant the hash gives now, and the effective preferences.
    ///
    /// Reading assigns nothing and counts no exposure: `assigned` is the
    /// stored sticky variant (or null), `would_be` what the hash picks under
    /// the current weights, and `variant` what a matching request would be
    /// injected now (null when the user is outside the experiment's traffic).
    /// Rules are evaluated against a request with no headers, cookies or
    /// query on path `/` (only the user id is known here).
    pub(crate) async fn user_view(&self, user_id: &str) -> Result<Value, EdgeAdminError> {
        check_user(user_id)?;
        self.defs.ensure_loaded().await;
        let defs = self.defs.current.load_full();
        let every: Vec<_> = defs.experiments.iter().map(|e| (e, None)).collect();
        let state = self.read_user_state(&defs, user_id, None, &every).await;
        let (prefs_read, others) = state
            .reads
            .split_last()
            .ok_or_else(|| EdgeAdminError::Unavailable("missing preferences read".into()))?;
        for read in others {
            if let Err(err) = read {
                return Err(EdgeAdminError::Unavailable(err.to_string()));
            }
        }
        let prefs_doc = match prefs_read {
            Ok(Some(entry)) => Self::stored_prefs(entry).map_err(EdgeAdminError::Unavailable)?,
            Ok(None) => prefs::Document::new(),
            Err(KvError::InvalidKey(m) | KvError::InvalidArgument(m)) => {
                return Err(EdgeAdminError::BadRequest(m.clone()))
            }
            Err(err) => return Err(EdgeAdminError::Unavailable(err.to_string())),
        };
        let no_headers = http::HeaderMap::new();
        let req = RequestAttributes {
            user_id,
            path: "/",
            query: None,
            headers: &no_headers,
            country: None,
        };

        let values = self.flag_overrides(&defs, user_id, Some(state.flags()));
        let mut flags = Map::new();
        for (flag, overridden) in &values {
            let (value, source) = match overridden {
                Some(v) => (v.to_json(), "override"),
                None => {
                    let (v, source) = flag.value_for(&req);
                    (v.to_json(), source)
                }
            };
            flags.insert(
                flag.name.clone(),
                json!({ "value": value, "source": source, "description": flag.description }),
            );
        }

        let mut experiments = Map::new();
        for (i, exp) in defs.experiments.iter().enumerate() {
            let hashed = exp.hashed(user_id);
            let in_traffic = hashed.is_some();
            let stored = state
                .sticky(i)
                .and_then(|r| r.as_ref().ok())
                .and_then(Option::as_ref);
            let assigned = stored
                .as_ref()
                .map(|e| String::from_utf8_lossy(&e.value).into_owned());
            let would_be = hashed.map(|i| exp.variants[i].name.clone());
            let variant = if in_traffic {
                stored
                    .as_ref()
                    .and_then(|e| exp.variant(&e.value))
                    .map(|i| exp.variants[i].name.clone())
                    .or_else(|| would_be.clone())
            } else {
                None
            };
            let assigned_expires_at = stored
                .as_ref()
                .and_then(|e| e.expires_at)
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            experiments.insert(
                exp.name.clone(),
                json!({
                    "in_traffic": in_traffic,
                    "path_prefix": exp.path_prefix,
                    "assigned": assigned,
                    "assigned_expires_at": assigned_expires_at,
                    "would_be": would_be,
                    "variant": variant,
                }),
            );
        }

        let effective = prefs::effective(&self.prefs.defaults, &prefs_doc);
        let mut headers = Map::new();
        if !defs.flags.is_empty() {
            headers.insert(
                super::FEATURE_FLAGS.as_str().into(),
                Self::flags_dictionary(&defs, &req, &values).into(),
            );
        }
        headers.insert(
            self.prefs.header.as_str().into(),
            prefs::header_json(&effective).into(),
        );
        Ok(json!({
            "user_id": user_id,
            "environment": self.kv.namespace(),
            "flags": flags,
            "experiments": experiments,
            "preferences": effective,
            "headers": headers,
        }))
    }

    /// Sets a per-user override; `value` must be of the flag default's kind
    /// (boolean, string or number) and representable in X-Feature-Flags.
    pub async fn set_flag_override(
        &self,
        flag: &str,
        user_id: &str,
        value: Value,
    ) -> Result<Value, EdgeAdminError> {
        self.defs.ensure_loaded().await;
        let defs = self.defs.current.load_full();
        let flag = Self::flag(&defs, flag)?;
        check_user(user_id)?;
        FlagValue::typed(flag.kind, &value, self.defs.json_max)
            .map_err(|e| EdgeAdminError::BadRequest(format!("flag {:?}: {e}", flag.name)))?;
        let encoded =
            serde_json::to_vec(&value).map_err(|e| EdgeAdminError::BadRequest(e.to_string()))?;
        let opts = PutOptions {
            ttl: None,
            metadata: Some(json!({ "updated_at": unix_seconds() })),
        };
        self.kv
            .put(&flag_key(&flag.name, user_id), Bytes::from(encoded), opts)
            .await?;
        Ok(json!({ "flag": flag.name, "user_id": user_id, "value": value, "source": "override" }))
    }

    /// Removes a per-user override; `deleted` says whether one existed.
    pub(crate) async fn delete_flag_override(
        &self,
        flag: &str,
        user_id: &str,
    ) -> Result<Value, EdgeAdminError> {
        self.defs.ensure_loaded().await;
        let defs = self.defs.current.load_full();
        let flag = Self::flag(&defs, flag)?;
        check_user(user_id)?;
        let deleted = self.kv.delete(&flag_key(&flag.name, user_id)).await?;
        Ok(json!({
            "flag": flag.name,
            "user_id": user_id,
            "deleted": deleted,
            "value": flag.default.to_json(),
            "source": "default",
        }))
    }

    /// The effective preferences: config defaults overlaid with the user's own.
    pub(crate) async fn get_preferences(&self, user_id: &str) -> Result<Value, EdgeAdminError> {
        check_user(user_id)?;
        let stored = self.stored_preferences(user_id).await?;
        Ok(Value::Object(prefs::effective(
            &self.prefs.defaults,
            &stored,
        )))
    }

    /// Shallow-merges `patch` into the user's preferences (a `null` removes a
    /// key) and returns the new effective document. Refused, with nothing
    /// changed: a non-object, a value whose JSON type differs from the key's
    /// default, a result over `preferences.max_bytes`.
    ///
    /// Concurrent patches of one user are serialized within this process;
    /// across instances sharing a store the last write wins.
    pub async fn patch_preferences(
        &self,
        user_id: &str,
        patch: Value,
    ) -> Result<Value, EdgeAdminError> {
        check_user(user_id)?;
        // Shared with the renewals of the write queue, which re-store the
        // document under the same lock.
        let _serialized = self.writes.prefs_lock(user_id).lock().await;
        let stored = self.stored_preferences(user_id).await?;
        let next = prefs::apply_patch(&self.prefs.defaults, &stored, &patch, self.prefs.max_bytes)
            .map_err(|e| EdgeAdminError::BadRequest(e.to_string()))?;
        let key = prefs_key(user_id);
        if next.is_empty() {
            self.kv.delete(&key).await?;
        } else {
            let encoded =
                serde_json::to_vec(&next).map_err(|e| EdgeAdminError::BadRequest(e.to_string()))?;
            // Idle documents expire; requests from the user renew them.
            let opts = PutOptions {
                ttl: Some(self.prefs_ttl),
                metadata: Some(json!({ "updated_at": unix_seconds() })),
            };
            self.kv.put(&key, Bytes::from(encoded), opts).await?;
        }
        Ok(Value::Object(prefs::effective(&self.prefs.defaults, &next)))
    }

    /// An experiment's definition and this process's counts per variant:
    /// `exposures` (requests the variant was injected on), `exposed_users`
    /// and `conversions` (2xx, once per user and day).
    pub(crate) async fn experiment_view(&self, name: &str) -> Result<Value, EdgeAdminError> {
        self.defs.ensure_loaded().await;
        let defs = self.defs.current.load_full();
        let exp = Self::experiment(&defs, name)?;
        let total_weight: f64 = exp.variants.iter().map(|v| v.weight).sum();
        let mut total_exposures = 0u64;
        let variants: Vec<Value> = exp
            .variants
            .iter()
            .map(|v| {
                let exposures = v.exposures.sum();
                total_exposures += exposures;
                json!({
                    "name": v.name,
                    "weight": v.weight,
                    "share": v.weight / total_weight,
                    "exposures": exposures,
                    "exposed_users": v.unique_exposures.sum(),
                    "conversions": v.conversions.sum(),
                })
            })
            .collect();
        Ok(json!({
            "name": exp.name,
            "description": exp.description,
            "header": exp.header.as_str(),
            "traffic": exp.traffic,
            "path_prefix": exp.path_prefix,
            "salted": exp.salted,
            "bucket_version": exp.bucket_version,
            "hash": defs.doc.experiments.get(&exp.name).map(|d| d.hash),
            "definition": defs.doc.experiments.get(&exp.name),
            "variants": variants,
            "exposures": total_exposures,
        }))
    }

    /// Forgets a user's sticky assignment; the next request re-assigns by hash
    /// under the current weights.
    pub(crate) async fn reset_assignment(
        &self,
        name: &str,
        user_id: &str,
    ) -> Result<Value, EdgeAdminError> {
        self.defs.ensure_loaded().await;
        let defs = self.defs.current.load_full();
        let exp = Self::experiment(&defs, name)?;
        check_user(user_id)?;
        let deleted = self.kv.delete(&exp.sticky_key(user_id)).await?;
        Ok(json!({ "experiment": exp.name, "user_id": user_id, "deleted": deleted }))
    }

    /// Exact sums of every counter: requests per route, flag evaluations,
    /// exposures per experiment and variant.
    pub(crate) async fn counters(&self) -> Result<Value, EdgeAdminError> {
        serde_json::to_value(self.counters.snapshot())
            .map_err(|e| EdgeAdminError::Unavailable(e.to_string()))
    }
}
