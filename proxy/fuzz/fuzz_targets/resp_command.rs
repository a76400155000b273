//! The RESP command splitter on arbitrary client bytes, fed in two reads split at a point the
//! input chooses: it must never panic, never return a command longer than its input, and cut the
//! same commands whether the bytes arrive at once or in pieces.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice::protocol::redis::resp::{CommandLimits, CommandSplitter};

fn split_all(chunks: &[&[u8]]) -> (Vec<Vec<Vec<u8>>>, bool) {
    let limits = CommandLimits {
        max_command: 1 << 16,
        max_args: 1024,
    };
    let mut s = CommandSplitter::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match s.split(&mut buf, &limits) {
                Ok(Some(cmd)) => {
                    assert!(!cmd.args.is_empty());
                    if !cmd.inline {
                        let total: usize = cmd.args.iter().map(|a| a.len()).sum();
                        assert!(total <= cmd.raw.len());
                    }
                    out.push(cmd.args.iter().map(|a| a.to_vec()).collect());
                }
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let cut = (cut as usize).min(data.len());
    let (whole, whole_err) = split_all(&[data]);
    let (parts, parts_err) = split_all(&[&data[..cut], &data[cut..]]);
    assert_eq!(whole_err, parts_err);
    assert_eq!(whole, parts);
});
