//! Just enough JSON to read a kombu envelope lazily: find a key of an object and return its
//! value's bytes, skipping every other value without building it. A Celery task message is a few
//! hundred bytes of envelope around a base64 body; policies usually want `headers.task` and
//! nothing else, so nothing else is decoded.
//!
//! Input comes from the network: every function returns `None` on malformed JSON, never
//! panics, and nesting deeper than [`MAX_DEPTH`] is refused rather than recursed into.

use std::borrow::Cow;

/// Deepest nesting skipped over.
pub const MAX_DEPTH: usize = 128;

fn ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// End (exclusive) of the string starting at `i` (which is `"`).
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match b.get(j)? {
            b'"' => return Some(j + 1),
            b'\\' => j += 2,
            c if *c < 0x20 => return None,
            _ => j += 1,
        }
    }
}

/// End (exclusive) of the value starting at `i` (after whitespace).
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut j = i;
    loop {
        j = ws(b, j);
        match b.get(j)? {
            b'"' => j = skip_string(b, j)?,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return None;
                }
                j += 1;
                continue;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                j += 1;
            }
            b',' | b':' if depth > 0 => {
                j += 1;
                continue;
            }
            c if c.is_ascii_digit() || *c == b'-' => {
                j += 1;
                while matches!(b.get(j), Some(c) if c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-'))
                {
                    j += 1;
                }
            }
            b't' if b.get(j..j + 4) == Some(b"true") => j += 4,
            b'f' if b.get(j..j + 5) == Some(b"false") => j += 5,
            b'n' if b.get(j..j + 4) == Some(b"null") => j += 4,
            _ => return None,
        }
        if depth == 0 {
            return Some(j);
        }
    }
}

/// Visit each `(key, value)` of the object `obj` (raw bytes); stop when `f` returns `true`.
/// Returns `None` if the object is malformed before `f` stopped.
fn each_member<'a>(obj: &'a [u8], mut f: impl FnMut(&'a [u8], &'a [u8]) -> bool) -> Option<()> {
    let mut i = ws(obj, 0);
    if obj.get(i)? != &b'{' {
        return None;
    }
    i = ws(obj, i + 1);
    if obj.get(i)? == &b'}' {
        return Some(());
    }
    loop {
        if obj.get(i)? != &b'"' {
            return None;
        }
        let kend = skip_string(obj, i)?;
        let key = obj.get(i + 1..kend - 1)?;
        i = ws(obj, kend);
        if obj.get(i)? != &b':' {
            return None;
        }
        let vstart = ws(obj, i + 1);
        let vend = skip_value(obj, vstart)?;
        if f(key, obj.get(vstart..vend)?) {
            return Some(());
        }
        i = ws(obj, vend);
        match obj.get(i)? {
            b',' => i = ws(obj, i + 1),
            b'}' => return Some(()),
            _ => return None,
        }
    }
}

/// The raw value of `key` in the object `obj` (the first match).
pub fn get<'a>(obj: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let mut found = None;
    each_member(obj, |k, v| {
        if key_eq(k, key) {
            found = Some(v);
            true
        } else {
            false
        }
    })?;
    found
}

/// The value at a dotted path, e.g. `headers.task`.
pub fn get_path<'a>(obj: &'a [u8], path: &str) -> Option<&'a [u8]> {
    path.split('.').try_fold(obj, get)
}

/// The keys of the object `obj`, unescaped.
pub fn keys(obj: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let ok = each_member(obj, |k, _| {
        if let Some(k) = unescape(k) {
            out.push(k.into_owned());
        }
        false
    });
    if ok.is_none() {
        out.clear();
    }
    out
}

fn key_eq(raw: &[u8], key: &str) -> bool {
    if !raw.contains(&b'\\') {
        return raw == key.as_bytes();
    }
    unescape(raw).is_some_and(|k| k == key)
}

/// A scalar value as text: strings unescaped, numbers and booleans as written; `null`, objects
/// and arrays give `None`.
pub fn text(value: &[u8]) -> Option<Cow<'_, str>> {
    match value.first()? {
        b'"' => unescape(value.get(1..value.len().checked_sub(1)?)?),
        b'{' | b'[' | b'n' => None,
        _ => std::str::from_utf8(value).ok().map(Cow::Borrowed),
    }
}

/// Unescape the inside of a JSON string.
fn unescape(s: &[u8]) -> Option<Cow<'_, str>> {
    if !s.contains(&b'\\') {
        return std::str::from_utf8(s).ok().map(Cow::Borrowed);
    }
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut pending_high: Option<u32> = None;
    while i < s.len() {
        let c = *s.get(i)?;
        if c != b'\\' {
            let run_end = s
                .get(i..)?
                .iter()
                .position(|&b| b == b'\\')
                .map_or(s.len(), |p| i + p);
            out.push_str(std::str::from_utf8(s.get(i..run_end)?).ok()?);
            i = run_end;
            continue;
        }
        let e = *s.get(i + 1)?;
        i += 2;
        let ch = match e {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hex = std::str::from_utf8(s.get(i..i + 4)?).ok()?;
                let u = u32::from_str_radix(hex, 16).ok()?;
                i += 4;
                if (0xD800..0xDC00).contains(&u) {
                    pending_high = Some(u);
                    continue;
                }
                if (0xDC00..0xE000).contains(&u) {
                    let high = pending_high.take()?;
                    char::from_u32(0x10000 + ((high - 0xD800) << 10) + (u - 0xDC00))?
                } else {
                    char::from_u32(u)?
                }
            }
            _ => return None,
        };
        if pending_high.is_some() {
            return None;
        }
        out.push(ch);
    }
    if pending_high.is_some() {
        return None;
    }
    Some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENVELOPE: &[u8] = br#"{"body": "W1s0LCA0XSwge30sIHt9XQ==", "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "reports.rebuild", "id": "6a1c", "shadow": null,
                    "eta": null, "retries": 0, "argsrepr": "(4, 4)", "kw\"q": "x\u00e9\ud83d\ude00"},
        "properties": {"correlation_id": "6a1c", "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": "celery"}}}"#;

    #[test]
    fn reads_a_kombu_envelope_lazily() {
        assert_eq!(
            get_path(ENVELOPE, "headers.task").and_then(text).as_deref(),
            Some("reports.rebuild")
        );
        assert_eq!(
            get_path(ENVELOPE, "properties.delivery_info.routing_key")
                .and_then(text)
                .as_deref(),
            Some("celery")
        );
        assert_eq!(
            get_path(ENVELOPE, "properties.priority")
                .and_then(text)
                .as_deref(),
            Some("0")
        );
        assert_eq!(get_path(ENVELOPE, "headers.shadow").and_then(text), None);
        assert_eq!(
            get_path(ENVELOPE, "headers.kw\"q")
                .and_then(text)
                .as_deref(),
            Some("xé😀")
        );
        let h = get(ENVELOPE, "headers").unwrap();
        assert_eq!(keys(h).len(), 8);
    }

    #[test]
    fn agrees_with_serde_json_on_valid_documents() {
        let v: serde_json::Value = serde_json::from_slice(ENVELOPE).unwrap();
        for (k, want) in v["headers"].as_object().unwrap() {
            let got = get_path(ENVELOPE, &format!("headers.{k}")).unwrap();
            let got: serde_json::Value = serde_json::from_slice(got).unwrap();
            assert_eq!(&got, want, "{k}");
        }
    }

    #[test]
    fn malformed_or_hostile_input_gives_none() {
        for bad in [
            &b""[..],
            b"[1]",
            b"{\"a\" 1}",
            b"{\"a\":}",
            b"{\"b\":1,,\"a\":2}",
            b"{\"a\":\"\\ud800\"}",
            b"{\"a\":tru}",
            b"{\"a\":\"x",
        ] {
            assert_eq!(
                get(bad, "a").and_then(text),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = format!("{{\"b\":{}1{}, \"a\":1}}", "[".repeat(200), "]".repeat(200));
        assert_eq!(get(deep.as_bytes(), "a"), None);
        let ok = format!("{{\"b\":{}1{}, \"a\":1}}", "[".repeat(100), "]".repeat(100));
        assert_eq!(get(ok.as_bytes(), "a").and_then(text).as_deref(), Some("1"));
    }
}
