//! The config fingerprint stored in a checkpoint: the resolved config flattened to dotted keys,
//! minus the keys that may change on resume, so that a mismatch names the keys that differ.

use serde_json::Value;
use std::collections::BTreeMap;

/// Flattens `value` (a serialised config) to `a.b.c -> JSON text`, leaving out every key equal
/// to or below one of `ignore` (e.g. `checkpoint`, `train.steps`).
pub fn flatten_config(value: &Value, ignore: &[&str]) -> BTreeMap<String, String> {
    fn walk(prefix: &str, value: &Value, ignore: &[&str], out: &mut BTreeMap<String, String>) {
        if ignore.iter().any(|i| prefix == *i || prefix.starts_with(&format!("{i}."))) {
            return;
        }
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, ignore, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", value, ignore, &mut out);
    out
}

/// A short hex fingerprint of flattened config keys.
pub fn fingerprint(flat: &BTreeMap<String, String>) -> String {
    let mut hasher = crc32fast::Hasher::new();
    for (k, v) in flat {
        hasher.update(k.as_bytes());
        hasher.update(b"=");
        hasher.update(v.as_bytes());
        hasher.update(b"\n");
    }
    format!("{:08x}", hasher.finalize())
}

/// `key: saved -> current` for every key that differs (missing on one side shown as `(unset)`).
pub fn config_differences(saved: &BTreeMap<String, String>, current: &BTreeMap<String, String>) -> Vec<String> {
    let unset = "(unset)".to_string();
    let mut keys: Vec<&String> = saved.keys().chain(current.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let a = saved.get(k).unwrap_or(&unset);
            let b = current.get(k).unwrap_or(&unset);
            (a != b).then(|| format!("{k}: {a} -> {b}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ignored_keys_do_not_change_the_fingerprint_and_others_are_named() {
        let ignore = ["checkpoint", "train.steps"];
        let a = json!({"train": {"steps": 10, "lr": 0.1}, "checkpoint": {"dir": "x"}, "model": {"arch": "r"}});
        let b = json!({"train": {"steps": 99, "lr": 0.2}, "checkpoint": {"dir": "y"}, "model": {"arch": "r"}});
        let fa = flatten_config(&a, &ignore);
        let fb = flatten_config(&b, &ignore);
        assert_eq!(fa.len(), 2);
        assert_ne!(fingerprint(&fa), fingerprint(&fb));
        assert_eq!(config_differences(&fa, &fb), vec!["train.lr: 0.1 -> 0.2".to_string()]);
        let c = json!({"train": {"steps": 5, "lr": 0.1}, "model": {"arch": "r"}});
        assert_eq!(fingerprint(&fa), fingerprint(&flatten_config(&c, &ignore)));
    }
}
