//! The config parser (`sluice::config::parse`) on arbitrary UTF-8 text: it must return a
//! `Config` or a `Report` naming at least one problem, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match sluice::config::parse(text, Path::new("fuzz.toml")) {
        Ok(cfg) => {
            assert_eq!(cfg.hash.len(), 16);
            assert!(!cfg.listeners.is_empty());
        }
        Err(report) => {
            assert!(!report.problems.is_empty(), "a report without problems");
            let lines = text.lines().count().max(1) + 1;
            for p in &report.problems {
                if let Some(l) = p.line {
                    assert!(
                        (1..=lines).contains(&l),
                        "problem on line {l} of a {lines}-line text"
                    );
                }
            }
            let _ = report.to_string();
        }
    }
});
