//! Configuration loading: arbitrary UTF-8 through `Config::from_toml` and
//! `validate`.
//!
//! Checked: no panic; a configuration that validates also yields its upstream
//! URL and limits (what `main` does next).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nearcache::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::from_toml(text, Path::new("fuzz.toml")) else {
        return;
    };
    if cfg.validate("fuzz.toml").is_ok() {
        assert!(
            cfg.upstream_url().is_ok(),
            "validated config has a bad upstream URL"
        );
        let _ = cfg.limits();
    }
});
