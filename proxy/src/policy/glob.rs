//! Glob patterns for `match` tables: `*` matches any run of characters, `?` one character.

/// A compiled glob with fast paths for the common shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Glob {
    /// `*`
    Any,
    /// No wildcard.
    Exact(String),
    /// `prefix*`
    Prefix(String),
    /// `*suffix`
    Suffix(String),
    /// Anything else.
    Pattern(Vec<char>),
}

impl Glob {
    /// Compile a pattern.
    pub fn new(p: &str) -> Glob {
        let wild = |c: char| c == '*' || c == '?';
        if p == "*" {
            Glob::Any
        } else if !p.contains(wild) {
            Glob::Exact(p.to_string())
        } else if p.ends_with('*') && !p[..p.len() - 1].contains(wild) {
            Glob::Prefix(p[..p.len() - 1].to_string())
        } else if p.starts_with('*') && !p[1..].contains(wild) {
            Glob::Suffix(p[1..].to_string())
        } else {
            Glob::Pattern(p.chars().collect())
        }
    }

    /// Whether `s` matches.
    pub fn matches(&self, s: &str) -> bool {
        match self {
            Glob::Any => true,
            Glob::Exact(e) => e == s,
            Glob::Prefix(p) => s.starts_with(p.as_str()),
            Glob::Suffix(p) => s.ends_with(p.as_str()),
            Glob::Pattern(p) => {
                let s: Vec<char> = s.chars().collect();
                wildmatch(p, &s)
            }
        }
    }
}

/// Iterative glob match with single-star backtracking: linear in practice, never exponential.
fn wildmatch(p: &[char], s: &[char]) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == '?' || Some(&c) == s.get(si) => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|&c| c == '*'))
}

#[cfg(test)]
mod tests {
    use super::Glob;

    #[test]
    fn globs_match_as_documented() {
        assert!(Glob::new("*").matches("anything"));
        assert!(Glob::new("auth.*").matches("auth.login_audit"));
        assert!(!Glob::new("auth.*").matches("reports.rebuild"));
        assert!(Glob::new("*.rebuild").matches("reports.rebuild"));
        assert!(Glob::new("web-?").matches("web-1"));
        assert!(!Glob::new("web-?").matches("web-12"));
        assert!(Glob::new("a*b*c").matches("a-x-b-y-c"));
        assert!(!Glob::new("a*b*c").matches("a-x-c-y-b"));
        assert!(Glob::new("").matches(""));
        assert!(!Glob::new("").matches("x"));
    }
}
