//! The live dashboard at `/` of the admin listener: one HTML page with its
//! script, its styles and the vendored uPlot (`vendor/`) inlined, all
//! embedded in the binary, so it loads with one request and works where
//! nothing but the admin listener is reachable. The page polls `/stats` and
//! draws what it gets; every figure is computed there or from deltas of its
//! counters, none here.
//!
//! Authorisation (when `admin.token` is set): a browser cannot put a header
//! on a page load, so `/` alone also accepts the token as `/?token=…`. The
//! page's script takes it from the address, removes it from the address bar
//! and history (`history.replaceState`), keeps it in memory only, and sends
//! it as `Authorization: Bearer` on its `/stats` fetches. The other
//! endpoints keep accepting the header only, so a token in a URL is never a
//! way to scrape. No cookie: cookies are scoped by host, not port, and would
//! hand the token to every other service on the same host.

use std::sync::LazyLock;

/// The page's skeleton; `/*…*/` markers in it are replaced by the assets.
const TEMPLATE: &str = include_str!("index.html");
const DASHBOARD_JS: &str = include_str!("dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard.css");
const UPLOT_JS: &str = include_str!("vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("vendor/uPlot.min.css");

/// The whole page, assembled on first use (inlined, not linked: the token
/// guards `/`, and a `<script src>` could not carry it).
pub static PAGE: LazyLock<String> = LazyLock::new(|| {
    TEMPLATE
        .replace("/*uPlot.min.css*/", UPLOT_CSS)
        .replace("/*dashboard.css*/", DASHBOARD_CSS)
        .replace("/*uPlot.iife.min.js*/", UPLOT_JS)
        .replace("/*dashboard.js*/", DASHBOARD_JS)
});

/// The page's Content-Security-Policy: its inline script and styles, fetches
/// to its own origin (`/stats`), and nothing else — no other origin can be
/// loaded from or sent to, whatever a key name in a table holds.
pub const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; img-src data:; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The `token` parameter of a query string, percent-decoded (`+` is a
/// space, as browsers encode forms); `None` if absent or not UTF-8.
pub fn query_token(query: &str) -> Option<String> {
    let raw = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))?;
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_read_from_the_query_and_percent_decoded() {
        assert_eq!(query_token("token=s3cret").as_deref(), Some("s3cret"));
        assert_eq!(query_token("a=1&token=a%2Bb+c").as_deref(), Some("a+b c"));
        assert_eq!(query_token("tokens=x"), None, "only the exact name");
        assert_eq!(query_token("token=%zz"), None, "bad escapes reject");
        assert_eq!(query_token("token=%4"), None, "truncated escapes reject");
        assert_eq!(query_token(""), None);
    }

    #[test]
    fn the_page_inlines_every_asset_and_links_to_nothing() {
        let page = PAGE.as_str();
        assert!(!page.contains("/*uPlot"), "every marker replaced");
        assert!(!page.contains("/*dashboard"), "every marker replaced");
        assert!(page.contains(UPLOT_JS) && page.contains(DASHBOARD_JS));
        // What the browser would fetch: nothing but `/stats` (the CSP
        // enforces it; this keeps the markup honest too).
        for attr in [" src=", " href=", "@import", "url(http"] {
            assert!(!page.contains(attr), "the page references {attr}");
        }
    }
}
