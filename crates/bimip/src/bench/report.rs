//! The readable form of a result: a two-column table of its (flattened) keys.

use serde_json::Value;

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::Array(a) if a.iter().any(|x| x.is_object()) => {
            out.push((prefix.to_string(), format!("[{} samples]", a.len())));
        }
        Value::Null => out.push((prefix.to_string(), "-".into())),
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

pub fn table(rec: &Value) -> String {
    let mut rows = Vec::new();
    flatten("", rec, &mut rows);
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut s = String::new();
    for (k, v) in rows {
        s.push_str(&format!("  {k:<w$}  {v}\n"));
    }
    s
}

pub fn print_table(rec: &Value) {
    let title = rec
        .get("scenario")
        .and_then(Value::as_str)
        .unwrap_or("result");
    println!("== bimip bench {title}");
    print!("{}", table(rec));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_nested_keys() {
        let t = table(&serde_json::json!({"a": 1, "lat": {"p50_ms": 2.5}, "x": null}));
        assert!(t.contains("lat.p50_ms"));
        assert!(t.contains("2.5"));
        assert!(t.contains("x"));
    }
}
