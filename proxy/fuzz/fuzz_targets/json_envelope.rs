//! The lazy JSON reader used on kombu envelopes: never panics on any input, and on documents
//! serde_json accepts it finds the same string value for every top-level key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::protocol::redis::json;

fuzz_target!(|data: &[u8]| {
    let _ = json::get_path(data, "headers.task").and_then(json::text);
    let _ = json::keys(data);
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(data)
    else {
        return;
    };
    // With a key repeated, serde_json keeps the last value and the lazy reader the first.
    let keys = json::keys(data);
    let unique: std::collections::HashSet<&String> = keys.iter().collect();
    if unique.len() != keys.len() {
        return;
    }
    for (k, v) in &map {
        if let serde_json::Value::String(want) = v {
            let got = json::get(data, k).and_then(json::text);
            assert_eq!(got.as_deref(), Some(want.as_str()), "key {k:?}");
        }
    }
});
