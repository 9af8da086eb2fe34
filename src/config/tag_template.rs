//! The template language of `[[cache.tag_rule]] tag`: literals and
//! `{segmentN}` placeholders, filled from the URL. Parsed when the config
//! loads (so a typo is a located config error), rendered by `cache::tags`.

/// One piece of a tag template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    /// The Nth (1-based) segment of the request path.
    Segment(usize),
}

/// A parsed tag template such as `user:{segment2}` or `section:{segment1}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses a template; unknown placeholders and stray braces are errors,
    /// so a typo is caught when the config loads, not as a silently missing tag.
    pub fn parse(src: &str) -> Result<Template, String> {
        if src.is_empty() {
            return Err("the tag template is empty".into());
        }
        let mut pieces = Vec::new();
        let mut rest = src;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    pieces.push(Piece::Literal(rest.to_string()));
                    break;
                }
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(format!("unmatched '}}' in tag template {src:?}"));
                }
                Some(i) => {
                    if i > 0 {
                        pieces.push(Piece::Literal(rest[..i].to_string()));
                    }
                    let after = &rest[i + 1..];
                    let end = after
                        .find('}')
                        .ok_or_else(|| format!("unclosed '{{' in tag template {src:?}"))?;
                    let name = &after[..end];
                    if name == "user" {
                        return Err(format!(
                            "{{user}} in tag template {src:?} would tag a shared entry with \
                             whoever filled it; take the id from the URL ({{segmentN}}) or \
                             have the origin send it in Surrogate-Key"
                        ));
                    }
                    pieces.push(placeholder(name).ok_or_else(|| {
                        format!("unknown placeholder {{{name}}} in tag template {src:?}")
                    })?);
                    rest = &after[end + 1..];
                }
            }
        }
        Ok(Template { pieces })
    }

    /// The tag for one URL, or `None` when a placeholder has no value
    /// (fewer path segments): no tag beats a wrong one.
    pub fn render(&self, path: &str) -> Option<String> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Literal(s) => out.push_str(s),
                Piece::Segment(n) => out.push_str(segment(path, *n)?),
            }
        }
        Some(out)
    }
}

fn placeholder(name: &str) -> Option<Piece> {
    let n: usize = name.strip_prefix("segment")?.parse().ok()?;
    (n >= 1).then_some(Piece::Segment(n))
}

/// The Nth (1-based) non-empty segment of the path, query excluded, as sent.
fn segment(path_and_query: &str, n: usize) -> Option<&str> {
    let path = path_and_query
        .split_once('?')
        .map_or(path_and_query, |(p, _)| p);
    path.split('/').filter(|s| !s.is_empty()).nth(n - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_and_refuse_typos() {
        assert!(Template::parse("p:{segment2}").is_ok());
        // Requester-based tags are refused, with the reason (hardening #6).
        let e = Template::parse("user:{user}").unwrap_err();
        assert!(e.contains("whoever filled it"), "{e}");
        for bad in [
            "",
            "u:{usr}",
            "u:{segment0}",
            "u:{segment}",
            "u:{user",
            "u:}x",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn templates_render_from_path() {
        let t = Template::parse("{segment1}/{segment2}:x").unwrap();
        assert_eq!(
            t.render("/users/42/orders?x=/y").as_deref(),
            Some("users/42:x")
        );
        // a missing value means no tag at all
        assert_eq!(t.render("/users"), None);
        assert_eq!(
            Template::parse("static").unwrap().render("/").as_deref(),
            Some("static")
        );
    }
}
