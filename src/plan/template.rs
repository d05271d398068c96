//! Command and URL templates: `{name}`, `{host}`, `{version}`, `{role}`,
//! `{group}` and a member's own `vars`, with `{{` and `}}` for literal braces.
//!
//! A template is parsed once, when the plan file is validated, so an unknown
//! placeholder is an error before anything runs. In shell commands every
//! substituted value is single-quoted unless it consists only of characters
//! no shell treats specially, so a value can never inject a command.

use std::collections::BTreeMap;
use std::fmt;

/// The placeholders every member has.
pub const BUILTIN_PLACEHOLDERS: [&str; 5] = ["name", "host", "version", "role", "group"];

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    raw: String,
    pieces: Vec<Piece>,
}

/// How substituted values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quoting {
    /// For `sh -c`: values quoted when they hold anything special.
    Shell,
    /// As they are (URLs, file names, metric selectors).
    Raw,
}

/// The values a template is rendered with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vars(BTreeMap<String, String>);

impl Vars {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets one value (replacing an earlier one).
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.0.insert(key.to_owned(), value.into());
        self
    }

    /// Sets one value in place.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.0.insert(key.to_owned(), value.into());
    }

    /// Whether `key` has a value.
    #[must_use]
    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

impl Template {
    /// Parses a template.
    ///
    /// # Errors
    /// An unclosed `{`, a lone `}`, or an empty or malformed placeholder name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(format!(
                            "unclosed '{{' in {raw:?} (write {{{{ for a literal brace)"
                        ));
                    }
                    let valid = !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if !valid {
                        return Err(format!(
                            "placeholder {{{name}}} in {raw:?} is not a name (letters, digits, '_', '-')"
                        ));
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Var(name));
                }
                '}' => {
                    return Err(format!(
                        "lone '}}' in {raw:?} (write }}}} for a literal brace)"
                    ));
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Self {
            raw: raw.to_owned(),
            pieces,
        })
    }

    /// The template as written.
    #[must_use]
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// The placeholder names it uses.
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Var(v) => Some(v.as_str()),
            Piece::Text(_) => None,
        })
    }

    /// The first placeholder `vars` has no value for.
    #[must_use]
    pub fn missing<'a>(&'a self, vars: &Vars) -> Option<&'a str> {
        self.placeholders().find(|p| !vars.has(p))
    }

    /// Renders the template. A placeholder without a value renders as
    /// `{name}` (validation makes sure that does not happen for real runs;
    /// dry runs show what is not known yet that way).
    #[must_use]
    pub fn render(&self, vars: &Vars, quoting: Quoting) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(v) => match vars.get(v) {
                    Some(value) if quoting == Quoting::Shell => out.push_str(&shell_quote(value)),
                    Some(value) => out.push_str(value),
                    None => {
                        out.push('{');
                        out.push_str(v);
                        out.push('}');
                    }
                },
            }
        }
        out
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Quotes `value` for a POSIX shell: as it is when it holds only characters
/// no shell treats specially, else in single quotes.
#[must_use]
pub fn shell_quote(value: &str) -> String {
    let plain = !value.is_empty()
        && value.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '.' | '_' | '-' | ':' | '/' | '@' | '%' | '+' | '=' | ',')
        });
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_quotes() {
        let t = Template::parse("ssh {host} systemctl restart spire-{role} # {{literal}}").unwrap();
        let vars = Vars::new().with("host", "10.0.0.1").with("role", "server");
        assert_eq!(
            t.render(&vars, Quoting::Shell),
            "ssh 10.0.0.1 systemctl restart spire-server # {literal}"
        );
        let evil = Vars::new().with("host", "a; rm -rf /").with("role", "it's");
        assert_eq!(
            t.render(&evil, Quoting::Shell),
            "ssh 'a; rm -rf /' systemctl restart spire-'it'\\''s' # {literal}"
        );
        assert_eq!(
            t.render(&evil, Quoting::Raw),
            "ssh a; rm -rf / systemctl restart spire-it's # {literal}"
        );
        assert_eq!(t.placeholders().collect::<Vec<_>>(), ["host", "role"]);
        assert_eq!(t.missing(&Vars::new().with("host", "x")), Some("role"));
        assert_eq!(
            t.render(&Vars::new(), Quoting::Raw),
            "ssh {host} systemctl restart spire-{role} # {literal}"
        );
    }

    #[test]
    fn rejects_malformed_templates() {
        for bad in ["{name", "name}", "{}", "{a b}", "x {na{me}"] {
            assert!(Template::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(shell_quote(""), "''");
    }
}
