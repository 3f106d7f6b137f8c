//! One command through redis-rs, and reading what it answered: for tests that
//! care about values rather than the exact frames (those use raw sockets).

use redis::Value;
use redis::aio::MultiplexedConnection;

/// Sends `args` (the command and its arguments) and converts the reply to
/// `T`; fails the test on an error reply.
pub async fn q<T: redis::FromRedisValue>(conn: &mut MultiplexedConnection, args: &[&str]) -> T {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(conn).await.unwrap()
}

/// A string, status or integer reply as text.
pub fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        other => panic!("not a string: {other:?}"),
    }
}

/// A map reply (RESP3) or a flat key/value array (RESP2) as pairs.
pub fn pairs(v: &Value) -> Vec<(String, Value)> {
    match v {
        Value::Array(items) => {
            assert!(items.len() % 2 == 0, "odd key/value array {items:?}");
            items
                .chunks(2)
                .map(|kv| (text(&kv[0]), kv[1].clone()))
                .collect()
        }
        Value::Map(kvs) => kvs.iter().map(|(k, v)| (text(k), v.clone())).collect(),
        other => panic!("not a map: {other:?}"),
    }
}

/// `PROXY STATS`, flattened to dotted paths → integers: `upstream.circuit_state`,
/// `requests.commands.proxy`, and per rule `rules.prefix:t:.hits` (the
/// rule's selector as `PROXY STATS` names it). Non-integers are left out.
pub async fn proxy_stats(
    conn: &mut MultiplexedConnection,
) -> std::collections::HashMap<String, i64> {
    let v: Value = redis::cmd("PROXY")
        .arg("STATS")
        .query_async(conn)
        .await
        .unwrap();
    let mut flat = std::collections::HashMap::new();
    flatten("", &v, &mut flat);
    flat
}

fn flatten(path: &str, v: &Value, flat: &mut std::collections::HashMap<String, i64>) {
    let join = |name: &str| {
        if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        }
    };
    match v {
        Value::Int(n) => {
            flat.insert(path.to_string(), *n);
        }
        Value::Map(_) => {
            for (k, v) in pairs(v) {
                flatten(&join(&k), &v, flat);
            }
        }
        // A list of rules (maps naming their selector), or a RESP2 map.
        Value::Array(items)
            if items
                .iter()
                .all(|i| matches!(i, Value::Array(_) | Value::Map(_))) =>
        {
            for item in items {
                let fields = pairs(item);
                let selector = fields.iter().find_map(|(k, v)| {
                    (k == "prefix" || k == "pattern").then(|| format!("{k}:{}", text(v)))
                });
                for (k, v) in &fields {
                    flatten(
                        &join(&format!("{}.{k}", selector.as_deref().unwrap_or("?"))),
                        v,
                        flat,
                    );
                }
            }
        }
        Value::Array(items)
            if items.len() % 2 == 0
                && items
                    .iter()
                    .step_by(2)
                    .all(|k| matches!(k, Value::BulkString(_) | Value::SimpleString(_))) =>
        {
            for (k, v) in pairs(v) {
                flatten(&join(&k), &v, flat);
            }
        }
        _ => {}
    }
}
