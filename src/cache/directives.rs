//! Cache-Control parsing (RFC 9111 5.2, RFC 9110 5.6): pure functions, no I/O.
//!
//! Parsing follows the RFC's list syntax: directives are separated by commas,
//! a value is a token or a quoted-string, and commas inside a quoted-string do
//! not split. Delta-seconds that do not parse make a directive invalid: for
//! freshness directives that means "stale" (9111 4.2.1), never "fresh forever".

use http::header::{HeaderMap, CACHE_CONTROL, PRAGMA};

/// Largest delta-seconds we represent (9111 1.2.2: at least 2^31).
pub(crate) const DELTA_SECONDS_MAX: u64 = 2_147_483_648;

/// One `name[=value]` directive from a Cache-Control field, name lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Directive {
    pub(crate) name: String,
    /// `None` without a value, and when the directive is malformed.
    pub(crate) value: Option<String>,
    /// Malformed (`max-age =1`, an unclosed quote, junk before the next
    /// comma): its name counts, its value never does.
    pub(crate) malformed: bool,
}

/// Splits Cache-Control field lines into directives, honouring quoted strings.
pub(crate) fn parse_directives<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Vec<Directive> {
    let mut out = Vec::new();
    for bytes in lines {
        // Bytes, not &str: a field value may carry obs-text (RFC 9110 5.5)
        // in a quoted-string. Skipping a non-UTF-8 line would drop its
        // `no-store` or `private` along with it.
        let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&bytes[r]).into_owned();
        let mut i = 0;
        while i < bytes.len() {
            // skip separators and whitespace
            while i < bytes.len() && (bytes[i] == b',' || bytes[i] == b' ' || bytes[i] == b'\t') {
                i += 1;
            }
            let start = i;
            while i < bytes.len() && !matches!(bytes[i], b',' | b'=' | b' ' | b'\t') {
                i += 1;
            }
            if start == i {
                // a stray '=' or similar: skip to the next comma
                while i < bytes.len() && bytes[i] != b',' {
                    i += 1;
                }
                continue;
            }
            let name = text(start..i).to_ascii_lowercase();
            let mut value = None;
            let mut valid = true;
            if i < bytes.len() && bytes[i] == b'=' {
                i += 1;
                if i < bytes.len() && bytes[i] == b'"' {
                    i += 1;
                    // Bytes, not chars: a quoted-string may carry UTF-8
                    // (obs-text, RFC 9110 5.6.4), which `byte as char` would
                    // turn into Latin-1 mojibake.
                    let mut v = Vec::new();
                    let mut closed = false;
                    while i < bytes.len() {
                        match bytes[i] {
                            b'\\' if i + 1 < bytes.len() => {
                                v.push(bytes[i + 1]);
                                i += 2;
                            }
                            b'"' => {
                                closed = true;
                                i += 1;
                                break;
                            }
                            c => {
                                v.push(c);
                                i += 1;
                            }
                        }
                    }
                    valid = closed;
                    value = Some(String::from_utf8_lossy(&v).into_owned());
                } else {
                    let vstart = i;
                    while i < bytes.len() && !matches!(bytes[i], b',' | b' ' | b'\t') {
                        i += 1;
                    }
                    // `max-age= 3600`: whitespace after '=' leaves an empty value
                    value = Some(text(vstart..i));
                }
            } else {
                // `max-age =3600`: whitespace before '='. Skip any trailing junk
                // up to the next comma and treat the whole directive as invalid.
                let mut j = i;
                while j < bytes.len() && (bytes[j] == b' ' || bytes[j] == b'\t') {
                    j += 1;
                }
                if j < bytes.len() && bytes[j] != b',' {
                    valid = false;
                }
            }
            // anything else before the next comma makes the directive malformed
            while i < bytes.len() && bytes[i] != b',' {
                if bytes[i] != b' ' && bytes[i] != b'\t' {
                    valid = false;
                }
                i += 1;
            }
            out.push(Directive {
                name,
                value: if valid { value } else { None },
                malformed: !valid,
            });
        }
    }
    out
}

/// Parses delta-seconds (9111 1.2.2): digits only; overflow saturates at 2^31.
/// Leading zeros are fine ("003600" is 3600).
pub(crate) fn parse_delta_seconds(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut n: u64 = 0;
    for b in v.bytes() {
        n = n.saturating_mul(10).saturating_add(u64::from(b - b'0'));
        if n > DELTA_SECONDS_MAX {
            return Some(DELTA_SECONDS_MAX);
        }
    }
    Some(n)
}

/// A freshness-relevant delta directive: absent, present with a valid value,
/// or present but malformed (which 9111 4.2.1 says to treat as stale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Delta {
    #[default]
    Absent,
    Valid(u64),
    Invalid,
}

impl Delta {
    pub(crate) fn seconds(self) -> Option<u64> {
        match self {
            Delta::Valid(s) => Some(s),
            _ => None,
        }
    }
    pub(crate) fn is_present(self) -> bool {
        !matches!(self, Delta::Absent)
    }
}

fn delta_of(d: &Directive) -> Delta {
    match d.value.as_deref().and_then(parse_delta_seconds) {
        Some(s) => Delta::Valid(s),
        None => Delta::Invalid,
    }
}

/// Response Cache-Control directives that a shared cache acts on (9111 5.2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseDirectives {
    pub(crate) max_age: Delta,
    pub(crate) s_maxage: Delta,
    pub(crate) no_store: bool,
    /// `no-cache` without field names: store, but always revalidate.
    pub(crate) no_cache: bool,
    /// `no-cache="a, b"`: the named fields must not be sent without revalidation.
    pub(crate) no_cache_fields: Vec<String>,
    pub(crate) private: bool,
    pub(crate) public: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) proxy_revalidate: bool,
    pub(crate) must_understand: bool,
    pub(crate) immutable: bool,
    /// RFC 5861.
    pub(crate) stale_while_revalidate: Option<u64>,
    /// RFC 5861.
    pub(crate) stale_if_error: Option<u64>,
    /// Read from a targeted field (`CDN-Cache-Control`, RFC 9213) instead of
    /// Cache-Control; Expires is then ignored.
    pub(crate) targeted: bool,
}

pub(crate) const CDN_CACHE_CONTROL: &str = "cdn-cache-control";

impl ResponseDirectives {
    /// The directives a gateway obeys: `CDN-Cache-Control` when present and
    /// valid (RFC 9213 2.1: it then replaces Cache-Control and Expires),
    /// else Cache-Control.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        if let Some(targeted) = targeted_directives(headers) {
            let mut r = Self::from_directives(&targeted);
            r.targeted = true;
            return r;
        }
        let lines = headers.get_all(CACHE_CONTROL).iter().map(|v| v.as_bytes());
        Self::from_directives(&parse_directives(lines))
    }

    pub(crate) fn from_directives(dirs: &[Directive]) -> Self {
        let mut r = ResponseDirectives::default();
        for d in dirs {
            match d.name.as_str() {
                // 9111 4.2.1: with duplicates, use the first occurrence.
                "max-age" if !r.max_age.is_present() => r.max_age = delta_of(d),
                "s-maxage" if !r.s_maxage.is_present() => r.s_maxage = delta_of(d),
                "no-store" => r.no_store = true,
                "no-cache" => match d.value.as_deref() {
                    Some(fields) if !d.malformed && !fields.is_empty() => r
                        .no_cache_fields
                        .extend(fields.split(',').map(|f| f.trim().to_ascii_lowercase())),
                    _ => r.no_cache = true,
                },
                // `private="field"` is treated as plain private by a shared cache:
                // the safe reading (9111 5.2.2.7 allows it).
                "private" => r.private = true,
                "public" => r.public = true,
                "must-revalidate" => r.must_revalidate = true,
                "proxy-revalidate" => r.proxy_revalidate = true,
                "must-understand" => r.must_understand = true,
                "immutable" => r.immutable = true,
                "stale-while-revalidate" if r.stale_while_revalidate.is_none() => {
                    r.stale_while_revalidate = delta_of(d).seconds()
                }
                "stale-if-error" if r.stale_if_error.is_none() => {
                    r.stale_if_error = delta_of(d).seconds()
                }
                _ => {}
            }
        }
        r
    }

    /// 9111 3.2 / 5.2.2.2 / 5.2.2.8 / 5.2.2.10: a shared cache must not serve
    /// this response stale without successful validation.
    pub(crate) fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_present()
    }
}

/// `CDN-Cache-Control` as a Structured Field Dictionary (RFC 9213 2.1,
/// RFC 8941 3.2). An invalid field is ignored as a whole, as RFC 9213 says.
fn targeted_directives(headers: &HeaderMap) -> Option<Vec<Directive>> {
    let mut lines = headers.get_all(CDN_CACHE_CONTROL).iter().peekable();
    lines.peek()?;
    let mut out = Vec::new();
    for line in lines {
        let s = line.to_str().ok()?;
        for member in split_unquoted(s, b',') {
            let member = member.trim_matches([' ', '\t']);
            if member.is_empty() {
                return None; // empty list member: invalid dictionary
            }
            // key [ "=" value ] *( ";" parameter ): the key ends at the
            // first '=' or ';', and parameters (ignored) may hold strings
            // with '=' in them.
            let key_end = member.find(['=', ';']).unwrap_or(member.len());
            let key = &member[..key_end];
            let value = member[key_end..]
                .strip_prefix('=')
                .map(|v| split_unquoted(v, b';').into_iter().next().unwrap_or(""));
            let valid_key = key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'*')
                && key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b));
            if !valid_key {
                return None;
            }
            let value = match value {
                None => None,
                // sf-integer: at most 15 digits (RFC 8941 3.3.1, 4.2.4).
                Some(v) if v.bytes().all(|b| b.is_ascii_digit()) && !v.is_empty() => {
                    if v.len() > 15 {
                        return None;
                    }
                    Some(v.to_string())
                }
                Some(v) if v.starts_with('"') => {
                    if matches!(
                        key,
                        "max-age" | "s-maxage" | "stale-while-revalidate" | "stale-if-error"
                    ) {
                        return None; // wrong type for a delta directive
                    }
                    Some(sf_string(v)?)
                }
                Some(v)
                    if v.starts_with('-')
                        || v.starts_with('?')
                        || v.starts_with(|c: char| c.is_ascii_alphabetic() || c == '*') =>
                {
                    Some(v.to_string())
                }
                Some(_) => return None,
            };
            out.push(Directive {
                name: key.to_string(),
                value,
                malformed: false,
            });
        }
    }
    Some(out)
}

/// Splits at `sep` outside sf-strings: a string may hold commas and
/// semicolons (RFC 8941 3.3.3). `s` is ASCII, so every cut is a boundary.
fn split_unquoted(s: &str, sep: u8) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut in_string, mut escaped) = (0, false, false);
    for (i, &c) in s.as_bytes().iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
        } else if c == b'"' {
            in_string = true;
        } else if c == sep {
            out.push(&s[start..i]);
            start = i + 1;
        }
    }
    out.push(&s[start..]);
    out
}

/// An sf-string (RFC 8941 4.2.5): printable ASCII between quotes, only
/// `\"` and `\\` escaped, nothing after the closing quote.
fn sf_string(v: &str) -> Option<String> {
    let mut chars = v.strip_prefix('"')?.chars();
    let mut out = String::new();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                e @ ('"' | '\\') => out.push(e),
                _ => return None,
            },
            '"' => return chars.next().is_none().then_some(out),
            ' '..='~' => out.push(c),
            _ => return None,
        }
    }
    None // no closing quote
}

/// Request Cache-Control directives (9111 5.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestDirectives {
    pub(crate) max_age: Option<u64>,
    /// `Some(None)`: max-stale without a value (any staleness is acceptable).
    pub(crate) max_stale: Option<Option<u64>>,
    pub(crate) min_fresh: Option<u64>,
    pub(crate) no_cache: bool,
    pub(crate) no_store: bool,
    pub(crate) only_if_cached: bool,
    /// RFC 5861 4: how stale a response the client accepts when the origin
    /// fails.
    pub(crate) stale_if_error: Option<u64>,
}

impl RequestDirectives {
    /// Reads Cache-Control; `Pragma: no-cache` counts only when there is no
    /// Cache-Control field at all (9111 5.4).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut cc = headers.get_all(CACHE_CONTROL).iter().peekable();
        if cc.peek().is_none() {
            let pragma_no_cache = headers.get_all(PRAGMA).iter().any(|v| {
                v.to_str()
                    .map(|s| {
                        s.split(',')
                            .any(|p| p.trim().eq_ignore_ascii_case("no-cache"))
                    })
                    .unwrap_or(false)
            });
            return RequestDirectives {
                no_cache: pragma_no_cache,
                ..Default::default()
            };
        }
        let dirs = parse_directives(cc.map(|v| v.as_bytes()));
        let mut r = RequestDirectives::default();
        for d in &dirs {
            match d.name.as_str() {
                "max-age" if r.max_age.is_none() => {
                    // An invalid max-age in a request is ignored as unknown.
                    r.max_age = delta_of(d).seconds()
                }
                "max-stale" if r.max_stale.is_none() => {
                    r.max_stale = match &d.value {
                        None => Some(None),
                        Some(_) => delta_of(d).seconds().map(Some),
                    }
                }
                "min-fresh" if r.min_fresh.is_none() => r.min_fresh = delta_of(d).seconds(),
                "no-cache" => r.no_cache = true,
                "no-store" => r.no_store = true,
                "only-if-cached" => r.only_if_cached = true,
                "stale-if-error" if r.stale_if_error.is_none() => {
                    r.stale_if_error = delta_of(d).seconds()
                }
                _ => {}
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn resp(lines: &[&str]) -> ResponseDirectives {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(CACHE_CONTROL, HeaderValue::from_str(l).unwrap());
        }
        ResponseDirectives::from_headers(&h)
    }

    #[test]
    fn rfc9111_5_2_max_age_basic_and_leading_zeros() {
        assert_eq!(resp(&["max-age=3600"]).max_age, Delta::Valid(3600));
        assert_eq!(resp(&["max-age=003600"]).max_age, Delta::Valid(3600));
    }

    #[test]
    fn rfc9111_4_2_1_duplicate_directives_use_first() {
        assert_eq!(
            resp(&["max-age=1800, max-age=1"]).max_age,
            Delta::Valid(1800)
        );
        assert_eq!(
            resp(&["max-age=1", "max-age=1800"]).max_age,
            Delta::Valid(1)
        );
    }

    #[test]
    fn rfc9110_5_6_4_quoted_string_does_not_split_directives() {
        let d = resp(&["extension=\"max-age=3600\", max-age=1"]);
        assert_eq!(d.max_age, Delta::Valid(1));
        let d = resp(&["max-age=1, extension=\"max-age=3600\""]);
        assert_eq!(d.max_age, Delta::Valid(1));
    }

    #[test]
    fn rfc9111_1_2_2_invalid_delta_seconds_are_invalid_not_absent() {
        assert_eq!(resp(&["max-age='3600'"]).max_age, Delta::Invalid);
        assert_eq!(resp(&["max-age=a3600"]).max_age, Delta::Invalid);
        assert_eq!(resp(&["max-age=3600a"]).max_age, Delta::Invalid);
        assert_eq!(resp(&["max-age= 3600"]).max_age, Delta::Invalid);
        assert_eq!(resp(&["max-age =3600"]).max_age, Delta::Invalid);
        assert_eq!(resp(&["max-age=-1"]).max_age, Delta::Invalid);
    }

    #[test]
    fn rfc9111_5_2_quoted_max_age_is_accepted() {
        // 9111 5.2: senders should use token form, recipients accept quoted.
        assert_eq!(resp(&["max-age=\"3600\""]).max_age, Delta::Valid(3600));
    }

    #[test]
    fn rfc9111_1_2_2_delta_seconds_saturate_at_2_pow_31() {
        assert_eq!(
            parse_delta_seconds("99999999999999999999"),
            Some(DELTA_SECONDS_MAX)
        );
    }

    #[test]
    fn rfc9111_5_2_directive_names_are_case_insensitive() {
        let d = resp(&["No-Store, MAX-AGE=5, Private"]);
        assert!(d.no_store && d.private);
        assert_eq!(d.max_age, Delta::Valid(5));
    }

    #[test]
    fn rfc9111_5_2_2_4_no_cache_with_fields_is_qualified() {
        let d = resp(&["no-cache=\"set-cookie, x-a\""]);
        assert!(!d.no_cache);
        assert_eq!(d.no_cache_fields, vec!["set-cookie", "x-a"]);
        assert!(resp(&["no-cache"]).no_cache);
    }

    #[test]
    fn rfc5861_stale_extensions() {
        let d = resp(&["max-age=1, stale-while-revalidate=30, stale-if-error=60"]);
        assert_eq!(d.stale_while_revalidate, Some(30));
        assert_eq!(d.stale_if_error, Some(60));
    }

    #[test]
    fn rfc9111_3_2_s_maxage_and_revalidate_forbid_stale() {
        assert!(resp(&["s-maxage=5"]).forbids_stale());
        assert!(resp(&["max-age=5, proxy-revalidate"]).forbids_stale());
        assert!(resp(&["must-revalidate"]).forbids_stale());
        assert!(!resp(&["max-age=5"]).forbids_stale());
    }

    #[test]
    fn rfc9213_cdn_cache_control_overrides_and_invalid_is_ignored() {
        let mut h = HeaderMap::new();
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(CDN_CACHE_CONTROL, HeaderValue::from_static("max-age=600"));
        let d = ResponseDirectives::from_headers(&h);
        assert!(d.targeted && !d.no_store);
        assert_eq!(d.max_age, Delta::Valid(600));
        for bad in ["max-age=\"10000\"", "max-age=10000, &&&&&", "MaX-aGe=5"] {
            h.insert(CDN_CACHE_CONTROL, HeaderValue::from_static(bad));
            let d = ResponseDirectives::from_headers(&h);
            assert!(!d.targeted && d.no_store, "{bad}");
        }
    }

    #[test]
    fn rfc8941_cdn_cache_control_strings_may_hold_commas() {
        // RFC 8941 3.3.3: an sf-string may contain ',' and ';'. Splitting on
        // every comma made this valid field invalid, so it was ignored and
        // Cache-Control's no-store applied instead (RFC 9213 2.1).
        let mut h = HeaderMap::new();
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            CDN_CACHE_CONTROL,
            HeaderValue::from_static(r#"no-cache="set-cookie, x-a", max-age=60;n="a,b=c""#),
        );
        let d = ResponseDirectives::from_headers(&h);
        assert!(d.targeted && !d.no_store);
        assert_eq!(d.max_age, Delta::Valid(60));
        assert_eq!(d.no_cache_fields, vec!["set-cookie", "x-a"]);
        // Still invalid as a whole: a bad escape, an unclosed string, text
        // after the string, an sf-integer past 15 digits (8941 3.3.1).
        for bad in [
            r#"no-cache="a\b""#,
            r#"no-cache="abc"#,
            r#"no-cache="a"b"#,
            r#"no-cache="a\""#,
            "max-age=1234567890123456",
        ] {
            h.insert(CDN_CACHE_CONTROL, HeaderValue::from_static(bad));
            let d = ResponseDirectives::from_headers(&h);
            assert!(!d.targeted && d.no_store, "{bad}");
        }
    }

    #[test]
    fn rfc9111_5_4_pragma_only_without_cache_control() {
        let mut h = HeaderMap::new();
        h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
        assert!(RequestDirectives::from_headers(&h).no_cache);
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("nothing-to-see-here"),
        );
        assert!(!RequestDirectives::from_headers(&h).no_cache);
    }

    #[test]
    fn rfc9111_5_2_1_request_directives() {
        let mut h = HeaderMap::new();
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("max-stale, min-fresh=10, only-if-cached, max-age=5"),
        );
        let r = RequestDirectives::from_headers(&h);
        assert_eq!(r.max_stale, Some(None));
        assert_eq!(r.min_fresh, Some(10));
        assert_eq!(r.max_age, Some(5));
        assert!(r.only_if_cached);
    }

    #[test]
    fn rfc9110_5_6_4_obs_text_in_quoted_string_keeps_the_line() {
        // A Latin-1 byte in a quoted-string is obs-text, legal in a field
        // value; the whole line (and its no-store) used to be skipped.
        let mut h = HeaderMap::new();
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_bytes(b"no-store, x=\"caf\xe9\", max-age=5").unwrap(),
        );
        let d = ResponseDirectives::from_headers(&h);
        assert!(d.no_store);
        assert_eq!(d.max_age, Delta::Valid(5));
        // UTF-8 in a quoted value survives whole, not as Latin-1 mojibake.
        let dirs = parse_directives(std::iter::once("x=\"é\\é\"".as_bytes()));
        assert_eq!(dirs[0].value.as_deref(), Some("éé"));
    }

    // Property tests: Cache-Control comes from clients and origins alike.
    mod props {
        use super::*;
        use proptest::prelude::*;

        /// tchar (RFC 9110 5.6.2).
        const TOKEN: &str = "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}";

        /// A directive value: token or quoted-string (any printable ASCII,
        /// space, tab, or UTF-8 text).
        #[derive(Debug, Clone)]
        enum Value {
            Token(String),
            Quoted(String),
        }

        fn directives() -> impl Strategy<Value = Vec<(String, Option<Value>)>> {
            let value = prop_oneof![
                TOKEN.prop_map(Value::Token),
                "[ \t\\x21-\\x7e]{0,16}".prop_map(Value::Quoted),
                "\\PC{0,8}".prop_map(Value::Quoted),
            ];
            prop::collection::vec((TOKEN, prop::option::of(value)), 0..6)
        }

        fn render(dirs: &[(String, Option<Value>)], sep: &str) -> String {
            dirs.iter()
                .map(|(n, v)| match v {
                    None => n.clone(),
                    Some(Value::Token(t)) => format!("{n}={t}"),
                    Some(Value::Quoted(q)) => {
                        let escaped = q.replace('\\', "\\\\").replace('"', "\\\"");
                        format!("{n}=\"{escaped}\"")
                    }
                })
                .collect::<Vec<_>>()
                .join(sep)
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(
                lines in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..4),
            ) {
                let _ = parse_directives(lines.iter().map(Vec::as_slice));
                let mut h = HeaderMap::new();
                for l in &lines {
                    if let Ok(v) = HeaderValue::from_bytes(l) {
                        h.append(CACHE_CONTROL, v.clone());
                        h.append(CDN_CACHE_CONTROL, v.clone());
                        h.append(PRAGMA, v);
                    }
                }
                let _ = ResponseDirectives::from_headers(&h);
                let _ = RequestDirectives::from_headers(&h);
            }

            #[test]
            fn arbitrary_text_never_panics(s in "\\PC{0,64}", d in "\\PC{0,24}") {
                let _ = parse_directives(std::iter::once(s.as_bytes()));
                let _ = parse_delta_seconds(&d);
            }

            /// Well-formed directives parse back to themselves, names
            /// lowercased and quoted-pairs unescaped (RFC 9110 5.6.4).
            #[test]
            fn well_formed_round_trip(dirs in directives(), sep in "(, |,|,\t| ,  )") {
                let line = render(&dirs, &sep);
                let parsed = parse_directives(std::iter::once(line.as_bytes()));
                let expected: Vec<Directive> = dirs
                    .iter()
                    .map(|(n, v)| Directive {
                        name: n.to_ascii_lowercase(),
                        value: v.as_ref().map(|v| match v {
                            Value::Token(t) => t.clone(),
                            Value::Quoted(q) => q.clone(),
                        }),
                        malformed: false,
                    })
                    .collect();
                prop_assert_eq!(parsed, expected, "{}", line);
            }

            /// CDN-Cache-Control sf-strings round-trip whatever printable
            /// ASCII they hold, commas and semicolons included (RFC 8941
            /// 3.3.3), alongside an sf-integer.
            #[test]
            fn targeted_strings_round_trip(text in "[ -~]{0,24}", n in 0u64..=999_999_999_999_999) {
                let escaped = text.replace('\\', "\\\\").replace('"', "\\\"");
                let field = format!("x-ext=\"{escaped}\";p=\"a,b\", max-age={n}");
                let mut h = HeaderMap::new();
                h.insert(CDN_CACHE_CONTROL, HeaderValue::from_str(&field).unwrap());
                let dirs = targeted_directives(&h).expect("a valid dictionary");
                prop_assert_eq!(dirs[0].value.as_deref(), Some(text.as_str()));
                prop_assert_eq!(dirs[1].value.clone(), Some(n.to_string()));
            }

            /// Delta-seconds survive a render and parse, saturating at 2^31
            /// (RFC 9111 1.2.2), in both token and quoted form.
            #[test]
            fn freshness_round_trip(
                max_age in prop::option::of(any::<u64>()),
                s_maxage in prop::option::of(0u64..100_000),
                no_store in any::<bool>(),
                private in any::<bool>(),
                quoted in any::<bool>(),
            ) {
                let mut parts = Vec::new();
                if let Some(m) = max_age {
                    parts.push(if quoted { format!("max-age=\"{m}\"") } else { format!("Max-Age={m}") });
                }
                if let Some(s) = s_maxage {
                    parts.push(format!("s-maxage={s}"));
                }
                if no_store {
                    parts.push("no-store".into());
                }
                if private {
                    parts.push("PRIVATE".into());
                }
                let mut h = HeaderMap::new();
                h.insert(CACHE_CONTROL, HeaderValue::from_str(&parts.join(", ")).unwrap());
                let d = ResponseDirectives::from_headers(&h);
                let delta = |v: Option<u64>| v.map_or(Delta::Absent, |n| Delta::Valid(n.min(DELTA_SECONDS_MAX)));
                prop_assert_eq!(d.max_age, delta(max_age));
                prop_assert_eq!(d.s_maxage, delta(s_maxage));
                prop_assert_eq!((d.no_store, d.private), (no_store, private));
                let r = RequestDirectives::from_headers(&h);
                prop_assert_eq!(r.max_age, max_age.map(|n| n.min(DELTA_SECONDS_MAX)));
                prop_assert_eq!(r.no_store, no_store);
            }
        }
    }
}
