//! User preferences: a JSON object per user, merged over config defaults.
//!
//! Storage: the KV holds only the keys a user set (`prefs:user:{id}`), and
//! the effective document is `defaults` overlaid with them, so a later change
//! of a config default reaches every user who did not set that key.
//!
//! Header encoding: the effective document travels as compact JSON in one
//! request header. Header values must be visible ASCII, so every non-ASCII
//! character (and DEL) is written as a JSON `\uXXXX` escape (UTF-16 surrogate
//! pairs above U+FFFF). Such characters can only occur inside JSON strings,
//! where the escape is valid, so the header is lossless JSON: any JSON parser
//! on the origin reads back exactly the stored text. Rejecting non-ASCII
//! instead would refuse ordinary values such as `"language": "français"`.

use serde_json::{Map, Value};

pub(crate) type Document = Map<String, Value>;

/// The document as header-safe JSON (see `protocol::headers::ascii_json`).
pub(crate) fn header_json(doc: &Document) -> String {
    crate::protocol::headers::ascii_json(doc)
}

pub(crate) fn effective(defaults: &Document, stored: &Document) -> Document {
    let mut merged = defaults.clone();
    for (k, v) in stored {
        merged.insert(k.clone(), v.clone());
    }
    merged
}

pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PatchError {
    #[error("preferences must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error("preference {key:?} must be a {expected} like its default, got {got}")]
    WrongType {
        key: String,
        expected: &'static str,
        got: &'static str,
    },
    #[error(
        "preferences would be {size} bytes as sent to the origin, more than the limit of {max}"
    )]
    TooLarge { size: usize, max: usize },
}

/// Shallow merge of `patch` into the user's stored keys: a `null` removes the
/// key (its default, if any, shows again). Returns the new stored document,
/// or an error with nothing changed.
pub(crate) fn apply_patch(
    defaults: &Document,
    stored: &Document,
    patch: &Value,
    max_bytes: usize,
) -> Result<Document, PatchError> {
    let Value::Object(patch) = patch else {
        return Err(PatchError::NotAnObject(json_kind(patch)));
    };
    let mut next = stored.clone();
    for (key, value) in patch {
        if value.is_null() {
            next.remove(key);
            continue;
        }
        if let Some(default) = defaults.get(key) {
            let (expected, got) = (json_kind(default), json_kind(value));
            if expected != got {
                return Err(PatchError::WrongType {
                    key: key.clone(),
                    expected,
                    got,
                });
            }
        }
        next.insert(key.clone(), value.clone());
    }
    let size = header_json(&effective(defaults, &next)).len();
    if size > max_bytes {
        return Err(PatchError::TooLarge {
            size,
            max: max_bytes,
        });
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(value: Value) -> Document {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn defaults() -> Document {
        doc(json!({"theme": "light", "language": "en", "notifications": true}))
    }

    #[test]
    fn header_json_escapes_everything_outside_ascii() {
        let d = doc(json!({"language": "fran\u{e7}ais", "emoji": "\u{1f600}", "del": "\u{7f}"}));
        let header = header_json(&d);
        assert!(
            header.bytes().all(|b| (0x20..0x7f).contains(&b)),
            "{header}"
        );
        assert!(header.contains(r"fran\u00e7ais"));
        assert!(header.contains(r"\ud83d\ude00"));
        assert!(http::HeaderValue::from_str(&header).is_ok());
        let back: Value = serde_json::from_str(&header).unwrap();
        assert_eq!(back, Value::Object(d));
        assert_eq!(
            header_json(&defaults()),
            r#"{"language":"en","notifications":true,"theme":"light"}"#
        );
    }

    #[test]
    fn patch_merges_shallowly_and_null_removes() {
        let stored = doc(json!({"theme": "dark", "layout": {"sidebar": true}}));
        let next = apply_patch(
            &defaults(),
            &stored,
            &json!({"theme": null, "layout": {"compact": true}, "timezone": "UTC"}),
            4096,
        )
        .unwrap();
        assert_eq!(
            Value::Object(next.clone()),
            json!({"layout": {"compact": true}, "timezone": "UTC"})
        );
        assert_eq!(
            Value::Object(effective(&defaults(), &next)),
            json!({"theme": "light", "language": "en", "notifications": true,
                   "layout": {"compact": true}, "timezone": "UTC"})
        );
    }

    #[test]
    fn patch_refusals() {
        let stored = Document::new();
        assert_eq!(
            apply_patch(&defaults(), &stored, &json!(["theme"]), 4096),
            Err(PatchError::NotAnObject("array"))
        );
        assert_eq!(
            apply_patch(&defaults(), &stored, &json!({"notifications": "yes"}), 4096),
            Err(PatchError::WrongType {
                key: "notifications".into(),
                expected: "boolean",
                got: "string"
            })
        );
        let err =
            apply_patch(&defaults(), &stored, &json!({"bio": "x".repeat(200)}), 128).unwrap_err();
        assert!(
            matches!(err, PatchError::TooLarge { max: 128, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("limit of 128"));
    }
}
