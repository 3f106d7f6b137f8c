//! Redis-style glob matching (`*`, `?`, `[abc]`, `[^a-z]`, `\x`), as `KEYS`
//! and `SCAN MATCH` use it: for `pattern` cache rules and `PROXY INVALIDATE
//! <pattern>`.

/// Whether `text` matches `pattern`. Iterative with one backtrack point for
/// `*`, so it cannot blow up on adversarial patterns.
pub fn matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((true, next)) = class(pattern, p, text[t]) {
                        p = next;
                        t += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pattern.len() && pattern[p + 1] == text[t] => {
                    p += 2;
                    t += 1;
                    continue;
                }
                // An escape that does not match: never a literal backslash.
                b'\\' if p + 1 < pattern.len() => {}
                c if c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The literal bytes every match of `pattern` starts with: everything before
/// its first `*`, `?`, `[` or `\\`.
pub fn literal_prefix(pattern: &[u8]) -> &[u8] {
    let end = pattern
        .iter()
        .position(|c| matches!(c, b'*' | b'?' | b'[' | b'\\'))
        .unwrap_or(pattern.len());
    &pattern[..end]
}

/// `literal` as a pattern matching only itself (`*`, `?`, `[`, `]` and `\\`
/// escaped), e.g. to `SCAN MATCH` a prefix: `escape(p) + "*"`.
pub fn escape(literal: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(literal.len() + 4);
    for &c in literal {
        if matches!(c, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(c);
    }
    out
}

/// Matches `c` against the class starting at `pattern[at] == b'['`; returns
/// (matched, index after the class), or None if the class is unterminated.
fn class(pattern: &[u8], at: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = at + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut hit = false;
    while i < pattern.len() && pattern[i] != b']' {
        if pattern[i] == b'\\' && i + 1 < pattern.len() {
            hit |= pattern[i + 1] == c;
            i += 2;
        } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']' {
            let (lo, hi) = (
                pattern[i].min(pattern[i + 2]),
                pattern[i].max(pattern[i + 2]),
            );
            hit |= (lo..=hi).contains(&c);
            i += 3;
        } else {
            hit |= pattern[i] == c;
            i += 1;
        }
    }
    if i >= pattern.len() {
        return None;
    }
    Some((hit != negate, i + 1))
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs_match_like_redis() {
        assert!(matches(b"ticker:binance:*", b"ticker:binance:BTCUSDT"));
        assert!(!matches(b"ticker:binance:*", b"ticker:kraken:BTC"));
        assert!(matches(b"*", b""));
        assert!(matches(b"h?llo", b"hello"));
        assert!(matches(b"h[ae]llo", b"hallo"));
        assert!(!matches(b"h[^e]llo", b"hello"));
        assert!(matches(b"h[a-c]llo", b"hbllo"));
        assert!(matches(b"a\\*b", b"a*b"));
        assert!(!matches(b"a\\*b", b"axb"));
        assert!(matches(b"*:1m", b"candles:BTC:1m"));
        assert!(!matches(b"*:1m", b"candles:BTC:1h"));
        assert!(matches(b"a*b*c", b"aXXbYYc"));
    }

    #[test]
    fn an_escaped_literal_matches_only_itself() {
        for literal in [&b"ticker:"[..], b"a*b", b"q?[x]\\"] {
            let mut p = super::escape(literal);
            assert!(matches(&p, literal), "{p:?}");
            p.push(b'*');
            assert!(matches(&p, &[literal, b":rest"].concat()));
        }
        assert!(!matches(&super::escape(b"a*b"), b"axxb"));
    }

    #[test]
    fn literal_prefix_stops_at_the_first_special_byte() {
        assert_eq!(super::literal_prefix(b"candles:*:1m"), b"candles:");
        assert_eq!(super::literal_prefix(b"a?b"), b"a");
        assert_eq!(super::literal_prefix(b"x[ab]"), b"x");
        assert_eq!(super::literal_prefix(b"a\\*b"), b"a");
        assert_eq!(super::literal_prefix(b"*"), b"");
        assert_eq!(super::literal_prefix(b"plain"), b"plain");
    }

    #[test]
    fn adversarial_patterns_stay_linear_enough() {
        let text = vec![b'a'; 10_000];
        assert!(!matches(b"*a*a*a*a*a*a*b", &text));
    }
}
