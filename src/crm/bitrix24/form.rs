//! PHP-style form encoding (`a[b][0]=x`), the only nested format Bitrix24 speaks in two
//! places: the commands inside a `batch` request (each one a query string) and the
//! form-encoded bodies of its outgoing events (`data[PHONE_NUMBER]=...&auth[...]=...`).

use serde_json::{Map, Value};

/// Percent-encode one key or value (RFC 3986 unreserved characters stay as they are).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => {
                out.push('%');
                out.push_str(&format!("{b:02X}"));
            }
        }
    }
    out
}

/// Decode `%XX` and `+` (space). Invalid escapes are kept literally, never a panic.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encode a JSON object as a PHP-style query string. Booleans become `1`/`0` (PHP's
/// truthiness, which Bitrix24 parameters like `SHOW` and `CRM_CREATE` expect).
pub fn encode(params: &Value) -> String {
    let mut pairs = Vec::new();
    if let Value::Object(map) = params {
        for (k, v) in map {
            flatten(&percent_encode(k), v, &mut pairs);
        }
    }
    pairs.join("&")
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{prefix}%5B{}%5D", percent_encode(k)), v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}%5B{i}%5D"), v, out);
            }
        }
        Value::Null => out.push(format!("{prefix}=")),
        Value::Bool(b) => out.push(format!("{prefix}={}", if *b { 1 } else { 0 })),
        Value::Number(n) => out.push(format!("{prefix}={n}")),
        Value::String(s) => out.push(format!("{prefix}={}", percent_encode(s))),
    }
}

/// Decode a PHP-style query string into a JSON object of strings. Keys such as
/// `a[b][c]` nest; numeric or empty brackets (`a[]`) still nest as object keys
/// (callers read what they need by name). Depth and pair count are bounded.
pub fn decode(query: &str) -> Value {
    const MAX_PAIRS: usize = 1000;
    const MAX_DEPTH: usize = 8;
    let mut root = Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()).take(MAX_PAIRS) {
        let (k, v) = match pair.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(pair), String::new()),
        };
        let mut path: Vec<String> = Vec::new();
        match k.find('[') {
            Some(open) if open > 0 => {
                path.push(k[..open].to_string());
                let mut rest = &k[open..];
                while let Some(stripped) = rest.strip_prefix('[') {
                    match stripped.find(']') {
                        Some(close) => {
                            path.push(stripped[..close].to_string());
                            rest = &stripped[close + 1..];
                        }
                        None => break,
                    }
                    if path.len() >= MAX_DEPTH {
                        break;
                    }
                }
            }
            _ => path.push(k.clone()),
        }
        insert(&mut root, &path, v);
    }
    Value::Object(root)
}

fn insert(map: &mut Map<String, Value>, path: &[String], v: String) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        map.insert(first.clone(), Value::String(v));
        return;
    }
    let key = if first.is_empty() {
        map.len().to_string()
    } else {
        first.clone()
    };
    let entry = map.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    if let Value::Object(inner) = entry {
        let rest: Vec<String> = if rest[0].is_empty() {
            let mut r = rest.to_vec();
            r[0] = inner.len().to_string();
            r
        } else {
            rest.to_vec()
        };
        insert(inner, &rest, v);
    }
}

/// Turn objects whose keys are `0..n` into arrays (for values like `USER_ID[0]=1`).
pub fn arrays_from_indexed(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let indexed = !map.is_empty()
                && map
                    .keys()
                    .enumerate()
                    .all(|(i, k)| k.parse::<usize>().ok() == Some(i));
            if indexed {
                Value::Array(
                    map.into_iter()
                        .map(|(_, v)| arrays_from_indexed(v))
                        .collect(),
                )
            } else {
                Value::Object(
                    map.into_iter()
                        .map(|(k, v)| (k, arrays_from_indexed(v)))
                        .collect(),
                )
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_nested() {
        let v = json!({"CALL_ID": "externalCall.abc", "USER_ID": [1, 2], "FILTER": {"ACTIVE": true, "UF_PHONE_INNER": "10 1"}});
        let q = encode(&v);
        assert!(q.contains("USER_ID%5B0%5D=1"), "{q}");
        let back = arrays_from_indexed(decode(&q));
        assert_eq!(
            back,
            json!({"CALL_ID": "externalCall.abc", "USER_ID": ["1", "2"], "FILTER": {"ACTIVE": "1", "UF_PHONE_INNER": "10 1"}})
        );
    }

    #[test]
    fn event_body() {
        let body = "event=ONEXTERNALCALLSTART&data%5BPHONE_NUMBER%5D=%2B7%20916&data[EXTENSION]=101&auth[application_token]=tok&ts=1";
        let v = decode(body);
        assert_eq!(v["event"], "ONEXTERNALCALLSTART");
        assert_eq!(v["data"]["PHONE_NUMBER"], "+7 916");
        assert_eq!(v["data"]["EXTENSION"], "101");
        assert_eq!(v["auth"]["application_token"], "tok");
    }

    #[test]
    fn garbage_does_not_panic() {
        for s in [
            "%",
            "%4",
            "%zz",
            "a[",
            "a]b=c",
            "[x]=1",
            "a[][]=1&a[]=2",
            "==&&=",
            "%E2%82",
        ] {
            let _ = decode(s);
        }
        assert_eq!(percent_decode("%4"), "%4");
    }
}
