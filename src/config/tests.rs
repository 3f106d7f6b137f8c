//! The configuration's own tests: the shipped file, and every kind of
//! mistake named by its field.

#![allow(clippy::unwrap_used)]
use super::*;

#[test]
fn shipped_config_toml_parses_validates_and_matches_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let cfg = Config::from_file(&path).unwrap();
    cfg.validate("config.toml").unwrap();
    // Every value in the shipped file is the default, so the file is a
    // faithful reference for operators.
    assert_eq!(cfg, Config::default());
}

#[test]
fn unknown_fields_are_named() {
    let err = Config::from_toml("[server]\nlisten_addr = \"x\"\n", Path::new("my.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("my.toml:"), "{err}");
    assert!(err.contains("listen_addr"), "{err}");
}

#[test]
fn mistyped_values_are_named() {
    let err = Config::from_toml(
        "[upstream]\ncommand_timeout = \"fast\"\n",
        Path::new("c.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("command_timeout") && err.contains("fast"),
        "{err}"
    );
}

#[test]
fn validation_lists_every_problem_with_its_field() {
    let cfg = Config::from_toml(
        "[server]\nlisten = \"nowhere\"\nmax_clients = 0\n[upstream]\nurl = \"http://x\"\npool_size = 0\n",
        Path::new("c.toml"),
    )
    .unwrap();
    let err = cfg.validate("c.toml").unwrap_err().to_string();
    for field in [
        "server.listen",
        "server.max_clients",
        "upstream.url",
        "upstream.pool_size",
    ] {
        assert!(err.contains(field), "{field} missing from: {err}");
    }
    assert!(err.starts_with("c.toml:"), "{err}");
}

#[test]
fn slowlog_fields_are_validated_by_name() {
    let cfg = Config::from_toml(
        "[admin]\nslowlog_len = 1000000\nslowlog_threshold = \"2h\"\n",
        Path::new("c.toml"),
    )
    .unwrap();
    let err = cfg.validate("c.toml").unwrap_err().to_string();
    for field in ["admin.slowlog_len", "admin.slowlog_threshold"] {
        assert!(err.contains(field), "{field} missing from: {err}");
    }
    let cfg = Config::from_toml(
        "[admin]\nslowlog_len = 0\nslowlog_threshold = \"0\"\n",
        Path::new("c.toml"),
    )
    .unwrap();
    cfg.validate("c.toml").unwrap();
}

#[test]
fn every_example_config_parses_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = Config::from_file(&path).unwrap();
            // Examples name certificate files where a deployment would keep
            // them; only their absence here is forgiven.
            if let Err(ConfigError::Invalid { errors, .. }) =
                cfg.validate(&path.display().to_string())
            {
                let real: Vec<_> = errors
                    .iter()
                    .filter(|e| !(e.field.contains("tls.") && e.message.contains("No such file")))
                    .collect();
                assert!(real.is_empty(), "{}: {real:?}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 2, "examples/*.toml: {checked}");
}

#[test]
fn auth_by_redis_and_a_proxy_password_exclude_each_other() {
    let check = |toml: &str| {
        Config::from_toml(toml, Path::new("c.toml"))
            .unwrap()
            .validate("c.toml")
    };
    assert!(check("[server]\nauth = \"redis\"\n").is_ok());
    let err = check("[server]\nauth = \"redis\"\npassword = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.auth"), "{err}");
    let err = Config::from_toml("[server]\nauth = \"ldap\"\n", Path::new("c.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("auth"), "{err}");
    let err = check("[upstream]\nmin_idle_dedicated = 20\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("upstream.min_idle_dedicated"), "{err}");
}

#[test]
fn cache_rules_parse_and_bad_rules_are_named() {
    let cfg = Config::from_toml(
        "[cache]\nmax_memory = \"64MiB\"\n[[cache.rules]]\nprefix = \"ticker:\"\nttl = \"2s\"\n\
         [[cache.rules]]\nprefix = \"orderbook:\"\nttl = \"500ms\"\nnegative_ttl = \"100ms\"\n",
        Path::new("c.toml"),
    )
    .unwrap();
    cfg.validate("c.toml").unwrap();
    assert_eq!(cfg.cache.rules.len(), 2);
    assert_eq!(
        cfg.cache.rules[1].ttl.0,
        std::time::Duration::from_millis(500)
    );
    assert!(cfg.cache.rules[0].cache);

    let bad = Config::from_toml(
        "[[cache.rules]]\nprefix = \"a:\"\n[[cache.rules]]\nprefix = \"a:\"\nttl = \"1s\"\n",
        Path::new("c.toml"),
    )
    .unwrap();
    let err = bad.validate("c.toml").unwrap_err().to_string();
    assert!(err.contains("cache.rules[0] (prefix \"a:\").ttl"), "{err}");
    assert!(
        err.contains("cache.rules[1] (prefix \"a:\").prefix"),
        "{err}"
    );
}

#[test]
fn compression_and_warming_bounds_are_named_by_field() {
    let bad = Config::from_toml(
        "[cache.warm]\nmax_keys = 0\n\
         [[cache.rules]]\nprefix = \"a:\"\nttl = \"1s\"\nstore_compressed = true\n\
         [[cache.rules]]\nprefix = \"b:\"\nttl = \"1s\"\ncompress_min_size = 0\n",
        Path::new("c.toml"),
    )
    .unwrap();
    let err = bad.validate("c.toml").unwrap_err().to_string();
    assert!(err.contains("cache.warm.max_keys"), "{err}");
    assert!(
        err.contains("cache.rules[0] (prefix \"a:\").store_compressed: needs compress_min_size"),
        "{err}"
    );
    assert!(
        err.contains("cache.rules[1] (prefix \"b:\").compress_min_size"),
        "{err}"
    );
    let good = Config::from_toml(
        "[[cache.rules]]\nprefix = \"a:\"\nttl = \"1s\"\nstore_compressed = true\ncompress_min_size = \"1KiB\"\n",
        Path::new("c.toml"),
    )
    .unwrap();
    good.validate("c.toml").unwrap();
    assert_eq!(good.cache.rules[0].compress_min_size, Some(ByteSize(1024)));
}

#[test]
fn pattern_rules_are_named_by_their_pattern_and_checked() {
    let ok = Config::from_toml(
        "[[cache.rules]]\npattern = \"candles:*:1m\"\nttl = \"5s\"\n",
        Path::new("c.toml"),
    )
    .unwrap();
    ok.validate("c.toml").unwrap();
    assert_eq!(ok.cache.rules[0].selector(), ("pattern", "candles:*:1m"));

    let bad = Config::from_toml(
        "[[cache.rules]]\nprefix = \"c:\"\npattern = \"c:*\"\nttl = \"1s\"\n\
         [[cache.rules]]\npattern = \"\"\nttl = \"1s\"\n\
         [[cache.rules]]\npattern = \"x*\"\nttl = \"1s\"\n\
         [[cache.rules]]\npattern = \"x*\"\nttl = \"2s\"\n",
        Path::new("c.toml"),
    )
    .unwrap();
    let err = bad.validate("c.toml").unwrap_err().to_string();
    for want in [
        "c.toml",
        "cache.rules[0] (pattern \"c:*\").pattern: set either prefix or pattern",
        "cache.rules[1] (pattern \"\").pattern: must not be empty",
        "cache.rules[3] (pattern \"x*\").pattern: another rule has the same pattern",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
}

#[test]
fn nats_tls_files_must_be_readable_and_cert_and_key_go_together() {
    let bad = Config::from_toml(
        "[coherence]\ntls_ca_file = \"/nonexistent/ca.pem\"\n\
         tls_cert_file = \"/nonexistent/client.pem\"\n",
        Path::new("c.toml"),
    )
    .unwrap();
    let err = bad.validate("c.toml").unwrap_err().to_string();
    for want in [
        "coherence.tls_ca_file: cannot read /nonexistent/ca.pem",
        "coherence.tls_cert_file: tls_cert_file and tls_key_file go together",
        "coherence.tls_cert_file: cannot read /nonexistent/client.pem",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
}

#[test]
fn overrides_take_precedence_in_order() {
    let mut cfg = Config::default();
    let env = Overrides {
        listen: Some("127.0.0.1:1".into()),
        upstream: Some("redis://env:1".into()),
        ..Default::default()
    };
    let flags = Overrides {
        upstream: Some("redis://flag:2".into()),
        ..Default::default()
    };
    cfg.apply(env.then(flags));
    assert_eq!(cfg.server.listen, "127.0.0.1:1");
    assert_eq!(cfg.upstream.url, "redis://flag:2");
}

#[test]
fn bad_limits_are_named_by_field() {
    let cfg: Config = toml::from_str(
        r#"
        [[limits]]
        name = "a"
        rate = "10/s"
        commands = ["read", "NOSUCH"]
        per = ["pattern"]
        scope = "fleet"

        [[limits]]
        name = "a"
        rate = "10/s"
        burst = 0
        action = "delay"
        max_wait = "0"
        "#,
    )
    .unwrap();
    let err = cfg.validate("limits.toml").unwrap_err().to_string();
    for want in [
        "limits[0] (\"a\").commands: 'read' is not a command; a class is written '@read'",
        "limits[0] (\"a\").per: 'pattern' needs keys",
        "limits[0] (\"a\").scope: \"fleet\" shares the rate",
        "limits[1] (\"a\").name: another limit has the same name",
        "limits[1] (\"a\").burst: 0 is out of range",
        "limits[1] (\"a\").max_wait: must be more than 0",
    ] {
        assert!(err.contains(want), "{want}\n{err}");
    }
    let bad_rate = toml::from_str::<Config>("[[limits]]\nname = \"x\"\nrate = \"fast\"\n");
    assert!(
        bad_rate
            .unwrap_err()
            .to_string()
            .contains("'fast' is not a rate")
    );
}
