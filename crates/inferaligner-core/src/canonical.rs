//! JSON text for hashing: the same bytes whatever order a map keeps its keys in.

use serde_json::Value;

/// `value` as compact JSON with every object's keys sorted — what `serde_json::to_string`
/// writes with its default sorted maps. Hashes of JSON go through this, because a dependency
/// may turn on serde_json's `preserve_order` (llguidance does), which makes `to_string` write
/// keys in insertion order and would change every hash (a model's identity, a pack's
/// calibration sets) without a byte of the model changing.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write(value, &mut out);
    out
}

fn write(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_sorted_at_every_depth_and_the_text_is_compact() {
        let v = json!({"b": [ {"z": 1, "a": "x\"y"} ], "a": {"d": null, "c": 2.5}});
        assert_eq!(
            canonical_json(&v),
            r#"{"a":{"c":2.5,"d":null},"b":[{"a":"x\"y","z":1}]}"#
        );
    }
}
