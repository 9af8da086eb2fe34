//! RFC 8941 Structured Field serialization of flag values for the
//! `X-Feature-Flags` dictionary.
//!
//! Key casing: RFC 8941 dictionary keys are lowercase only (`lcalpha / "*"`
//! first, then `lcalpha / DIGIT / "_" / "-" / "." / "*"`), and strict parsers
//! reject a key such as `newUI`, which the issue's example shows. kvgate
//! therefore emits each configured flag name ASCII-lowercased (`newUI` ->
//! `newui`): the header stays a valid dictionary every SF parser accepts, the
//! mapping is trivial for an origin to apply, and config validation refuses
//! two flags that would collide once lowercased. Flag names everywhere else
//! (config, KV keys, admin API) keep their configured spelling.

use std::fmt::Write;

use super::edge::FlagValue;

/// Largest magnitude of an sf-integer (15 digits).
const MAX_SF_INTEGER: i64 = 999_999_999_999_999;
/// Largest integer component of an sf-decimal (12 digits).
const MAX_SF_DECIMAL_INTEGER: i64 = 999_999_999_999;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SfError {
    #[error("integer {0} is outside the structured-field range of +/-999,999,999,999,999")]
    IntegerRange(i64),
    #[error(
        "number {0} is not finite or has more than 12 integer digits (structured-field decimal)"
    )]
    DecimalRange(String),
    #[error("string holds a character outside printable ASCII, which a structured-field string cannot carry")]
    StringChar,
}

/// The dictionary key a flag name is emitted under (see the module docs).
pub(crate) fn dictionary_key(flag_name: &str) -> String {
    flag_name.to_ascii_lowercase()
}

/// Serializes a bare item: `?1` / `?0`, an sf-integer, an sf-decimal or an
/// sf-string.
pub(crate) fn serialize_item(value: &FlagValue) -> Result<String, SfError> {
    let mut out = String::new();
    write_item(&mut out, value)?;
    Ok(out)
}

fn write_item(out: &mut String, value: &FlagValue) -> Result<(), SfError> {
    match value {
        FlagValue::Bool(true) => out.push_str("?1"),
        FlagValue::Bool(false) => out.push_str("?0"),
        FlagValue::Int(i) => {
            if !(-MAX_SF_INTEGER..=MAX_SF_INTEGER).contains(i) {
                return Err(SfError::IntegerRange(*i));
            }
            let _ = write!(out, "{i}");
        }
        FlagValue::Dec(f) => write_decimal(out, *f)?,
        FlagValue::Json(v) => write_string(out, &json_text(v))?,
        FlagValue::Str(s) => write_string(out, s)?,
    }
    Ok(())
}

/// Compact JSON with every non-ASCII character escaped as `\uXXXX`: a JSON
/// flag travels as an sf-string holding this text.
pub(crate) fn json_text(value: &serde_json::Value) -> String {
    let raw = value.to_string();
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        if c.is_ascii() && c != '\u{7f}' {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

fn write_string(out: &mut String, s: &str) -> Result<(), SfError> {
    if !s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(SfError::StringChar);
    }
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(())
}

/// RFC 8941 section 4.1.5: round to three fractional digits (ties to even),
/// at most 12 integer digits, at least one fractional digit, no trailing zeros.
fn write_decimal(out: &mut String, value: f64) -> Result<(), SfError> {
    let out_of_range = || SfError::DecimalRange(value.to_string());
    let thousandths = (value * 1000.0).round_ties_even();
    if !thousandths.is_finite() {
        return Err(out_of_range());
    }
    // `as` saturates, and a saturated value fails the range check below.
    let thousandths = thousandths as i64;
    let integer = (thousandths / 1000).abs();
    if integer > MAX_SF_DECIMAL_INTEGER {
        return Err(out_of_range());
    }
    let mut fraction = (thousandths % 1000).abs();
    if thousandths < 0 {
        out.push('-');
    }
    let _ = write!(out, "{integer}.");
    if fraction == 0 {
        out.push('0');
        return Ok(());
    }
    let mut digits = 3;
    while fraction % 10 == 0 {
        fraction /= 10;
        digits -= 1;
    }
    let _ = write!(out, "{fraction:0digits$}");
    Ok(())
}

/// Appends one dictionary member: a bare key for `true` (RFC 8941 omits the
/// value of a true boolean member), else `key=item`.
pub(crate) fn write_member(out: &mut String, key: &str, value: &FlagValue) -> Result<(), SfError> {
    if !out.is_empty() {
        out.push_str(", ");
    }
    out.push_str(key);
    if *value != FlagValue::Bool(true) {
        out.push('=');
        write_item(out, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(v: FlagValue) -> String {
        serialize_item(&v).unwrap()
    }

    #[test]
    fn booleans_integers_strings() {
        assert_eq!(item(FlagValue::Bool(true)), "?1");
        assert_eq!(item(FlagValue::Bool(false)), "?0");
        assert_eq!(item(FlagValue::Int(-42)), "-42");
        assert_eq!(item(FlagValue::Int(MAX_SF_INTEGER)), "999999999999999");
        assert_eq!(
            serialize_item(&FlagValue::Int(MAX_SF_INTEGER + 1)),
            Err(SfError::IntegerRange(MAX_SF_INTEGER + 1))
        );
        assert_eq!(item(FlagValue::Str("dark".into())), "\"dark\"");
        assert_eq!(
            item(FlagValue::Str(r#"a "q" \ b"#.into())),
            r#""a \"q\" \\ b""#
        );
        assert_eq!(item(FlagValue::Str(String::new())), "\"\"");
        assert_eq!(
            serialize_item(&FlagValue::Str("caf\u{e9}".into())),
            Err(SfError::StringChar)
        );
        assert_eq!(
            serialize_item(&FlagValue::Str("a\nb".into())),
            Err(SfError::StringChar)
        );
    }

    #[test]
    fn decimals_follow_rfc_8941_rounding() {
        assert_eq!(item(FlagValue::Dec(0.5)), "0.5");
        assert_eq!(item(FlagValue::Dec(1.0)), "1.0");
        assert_eq!(item(FlagValue::Dec(-2.25)), "-2.25");
        assert_eq!(item(FlagValue::Dec(0.1234)), "0.123");
        assert_eq!(item(FlagValue::Dec(0.0625)), "0.062"); // tie rounds to even
        assert_eq!(item(FlagValue::Dec(0.001)), "0.001");
        assert_eq!(item(FlagValue::Dec(-0.0001)), "0.0");
        assert_eq!(item(FlagValue::Dec(999_999_999_999.5)), "999999999999.5");
        assert!(serialize_item(&FlagValue::Dec(1e12)).is_err());
        assert!(serialize_item(&FlagValue::Dec(f64::NAN)).is_err());
        assert!(serialize_item(&FlagValue::Dec(f64::INFINITY)).is_err());
    }

    #[test]
    fn dictionary_members() {
        let mut out = String::new();
        write_member(&mut out, &dictionary_key("newUI"), &FlagValue::Bool(true)).unwrap();
        write_member(
            &mut out,
            &dictionary_key("betaFeatures"),
            &FlagValue::Bool(false),
        )
        .unwrap();
        write_member(&mut out, "theme", &FlagValue::Str("dark".into())).unwrap();
        write_member(&mut out, "ratio", &FlagValue::Dec(0.5)).unwrap();
        write_member(&mut out, "limit", &FlagValue::Int(10)).unwrap();
        assert_eq!(
            out,
            r#"newui, betafeatures=?0, theme="dark", ratio=0.5, limit=10"#
        );
    }
}
