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
