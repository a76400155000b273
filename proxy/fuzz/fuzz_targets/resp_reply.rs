//! The streaming reply scanner on arbitrary server bytes, fed whole and in two pieces: it must
//! never panic, and find the same reply ends either way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::protocol::redis::resp::ReplyScanner;

fn ends(chunks: &[&[u8]]) -> Option<Vec<(usize, bool)>> {
    let mut s = ReplyScanner::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut base = 0usize;
    let mut out = Vec::new();
    for c in chunks {
        pending.extend_from_slice(c);
        let scan = s.scan(&pending).ok()?;
        assert!(scan.consumed <= pending.len());
        for (e, push) in scan.ends {
            assert!(e <= scan.consumed);
            out.push((base + e, push));
        }
        base += scan.consumed;
        pending.drain(..scan.consumed);
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let cut = (cut as usize).min(data.len());
    let whole = ends(&[data]);
    let parts = ends(&[&data[..cut], &data[cut..]]);
    if let (Some(w), Some(p)) = (whole, parts) {
        assert_eq!(w, p);
    }
});
