//! RESP2/RESP3 on the wire, both directions.
//!
//! - Client → server: [`CommandSplitter`] cuts whole commands (a multibulk array of bulk strings,
//!   or an inline command line) out of the read buffer without copying them: every argument is a
//!   [`Bytes`] slice of the original frame, which is forwarded as it arrived. Array sizes and bulk
//!   lengths are checked against the limits before anything is reserved, and a half-received
//!   command resumes where it stopped instead of being rescanned.
//! - Server → client: [`ReplyScanner`] only finds where each reply ends (nested arrays, maps,
//!   attributes, pushes), streaming: a reply's bulk payload never has to be in memory at once, so
//!   a large `GET` or `LRANGE` passes through with the same bounded buffer as a `+OK`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Longest inline command and longest simple line (`+`, `-`, `:`…), as in Redis itself.
pub const MAX_LINE: usize = 64 * 1024;

/// Most nested aggregates in one reply.
pub const MAX_DEPTH: usize = 64;

/// Bounds for what a client may send.
#[derive(Debug, Clone, Copy)]
pub struct CommandLimits {
    /// Largest command, all arguments together.
    pub max_command: u64,
    /// Most arguments in one command.
    pub max_args: u64,
}

impl Default for CommandLimits {
    fn default() -> Self {
        CommandLimits {
            max_command: 512 << 20,
            max_args: 1024 * 1024,
        }
    }
}

/// A malformed or oversized RESP value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    /// Bytes that are not RESP.
    #[error("protocol error: {0}")]
    Syntax(String),
    /// A declared size over a limit.
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Declared size.
        len: u64,
        /// The limit.
        max: u64,
    },
}

fn syntax(s: impl Into<String>) -> RespError {
    RespError::Syntax(s.into())
}

/// One client command: the bytes as received and its arguments (slices of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The whole command as it arrived.
    pub raw: Bytes,
    /// Its arguments, the command name first.
    pub args: Vec<Bytes>,
    /// Sent as an inline command (a plain text line).
    pub inline: bool,
}

impl Command {
    /// The command name, upper-cased (ASCII), or empty.
    pub fn name(&self) -> CommandName {
        CommandName::of(self.args.first().map(|a| &a[..]).unwrap_or_default())
    }

    /// Argument `i` (0 = the command name).
    pub fn arg(&self, i: usize) -> Option<&[u8]> {
        self.args.get(i).map(|a| &a[..])
    }

    /// Total size of the arguments after `from` (a pushed value, say).
    pub fn args_len(&self, from: usize) -> u64 {
        self.args.iter().skip(from).map(|a| a.len() as u64).sum()
    }
}

/// An upper-cased command name in a small fixed buffer (names longer than 24 bytes are not
/// commands sluice acts on; they compare unequal to everything).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CommandName {
    buf: [u8; 24],
    len: u8,
}

impl CommandName {
    fn of(name: &[u8]) -> CommandName {
        let mut buf = [0u8; 24];
        if name.len() > buf.len() {
            return CommandName { buf, len: u8::MAX };
        }
        for (d, s) in buf.iter_mut().zip(name) {
            *d = s.to_ascii_uppercase();
        }
        CommandName {
            buf,
            len: name.len() as u8,
        }
    }

    /// The upper-cased name.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len as usize).unwrap_or_default()
    }

    /// Whether this is `name` (given upper-case).
    pub fn is(&self, name: &str) -> bool {
        self.as_bytes() == name.as_bytes()
    }
}

impl std::fmt::Debug for CommandName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// Where a half-received multibulk command stopped.
#[derive(Debug, Default)]
struct Partial {
    /// Arguments declared.
    count: u64,
    /// Offset of the next unread argument header.
    pos: usize,
    /// Argument ranges found so far.
    ranges: Vec<(usize, usize)>,
}

/// Cuts client commands out of a read buffer.
#[derive(Debug, Default)]
pub struct CommandSplitter {
    partial: Option<Partial>,
}

impl CommandSplitter {
    /// Take the next whole command from the front of `buf`, or `None` until more bytes arrive.
    /// Empty inline lines (which Redis ignores) are skipped.
    pub fn split(
        &mut self,
        buf: &mut BytesMut,
        limits: &CommandLimits,
    ) -> Result<Option<Command>, RespError> {
        loop {
            if self.partial.is_none() {
                match buf.first() {
                    None => return Ok(None),
                    Some(b'*') => {
                        let Some((count, next)) = line_int(buf, 0)? else {
                            return Ok(None);
                        };
                        if count < 0 {
                            // `*-1` (a null array) is a no-op for Redis too.
                            buf.advance(next);
                            continue;
                        }
                        let count = count as u64;
                        if count > limits.max_args {
                            return Err(RespError::TooLarge {
                                what: "command argument count",
                                len: count,
                                max: limits.max_args,
                            });
                        }
                        if count == 0 {
                            buf.advance(next);
                            continue;
                        }
                        self.partial = Some(Partial {
                            count,
                            pos: next,
                            ranges: Vec::with_capacity(count.min(8) as usize),
                        });
                    }
                    Some(_) => match split_inline(buf)? {
                        Some(Some(c)) => return Ok(Some(c)),
                        Some(None) => continue,
                        None => return Ok(None),
                    },
                }
            }
            let Some(p) = self.partial.as_mut() else {
                continue;
            };
            while (p.ranges.len() as u64) < p.count {
                match buf.get(p.pos) {
                    None => return Ok(None),
                    Some(b'$') => {}
                    Some(&b) => {
                        return Err(syntax(format!(
                            "expected '$', got '{}'",
                            (b as char).escape_default()
                        )))
                    }
                }
                let Some((len, start)) = line_int(buf, p.pos)? else {
                    return Ok(None);
                };
                if len < 0 {
                    return Err(syntax("invalid bulk length"));
                }
                let len = len as u64;
                let total = (start as u64).saturating_add(len);
                if total > limits.max_command {
                    return Err(RespError::TooLarge {
                        what: "command",
                        len: total,
                        max: limits.max_command,
                    });
                }
                let end = start + len as usize;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                if buf.get(end..end + 2) != Some(b"\r\n") {
                    return Err(syntax("bulk string not terminated by CRLF"));
                }
                p.ranges.push((start, end));
                p.pos = end + 2;
            }
            let Some(p) = self.partial.take() else {
                continue;
            };
            let raw = buf.split_to(p.pos).freeze();
            let args = p.ranges.iter().map(|&(s, e)| raw.slice(s..e)).collect();
            return Ok(Some(Command {
                raw,
                args,
                inline: false,
            }));
        }
    }
}

/// An inline command: `Some(Some(cmd))`, `Some(None)` for an empty line (consumed), `None` when
/// the line is not complete yet.
fn split_inline(buf: &mut BytesMut) -> Result<Option<Option<Command>>, RespError> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_LINE {
            return Err(RespError::TooLarge {
                what: "inline command",
                len: buf.len() as u64,
                max: MAX_LINE as u64,
            });
        }
        return Ok(None);
    };
    if nl > MAX_LINE {
        return Err(RespError::TooLarge {
            what: "inline command",
            len: nl as u64,
            max: MAX_LINE as u64,
        });
    }
    let raw = buf.split_to(nl + 1).freeze();
    let line = raw.get(..nl).unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let args = split_args(line)?;
    if args.is_empty() {
        return Ok(Some(None));
    }
    Ok(Some(Some(Command {
        raw,
        args: args.into_iter().map(Bytes::from).collect(),
        inline: true,
    })))
}

/// Split an inline command line the way Redis does: whitespace-separated, with `"..."` (C-like
/// escapes, `\xHH`) and `'...'` (only `\'`) quoting.
pub fn split_args(line: &[u8]) -> Result<Vec<Vec<u8>>, RespError> {
    let mut out = Vec::new();
    let mut it = line.iter().copied().peekable();
    loop {
        while it.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            it.next();
        }
        let Some(&first) = it.peek() else {
            return Ok(out);
        };
        let mut arg = Vec::new();
        match first {
            b'"' => {
                it.next();
                loop {
                    match it.next() {
                        None => return Err(syntax("unbalanced quotes in inline command")),
                        Some(b'"') => break,
                        Some(b'\\') => match it.next() {
                            Some(b'x') => {
                                let h = it.next().and_then(hex);
                                let l = it.next().and_then(hex);
                                match (h, l) {
                                    (Some(h), Some(l)) => arg.push(h << 4 | l),
                                    _ => {
                                        return Err(syntax("invalid \\x escape in inline command"))
                                    }
                                }
                            }
                            Some(b'n') => arg.push(b'\n'),
                            Some(b'r') => arg.push(b'\r'),
                            Some(b't') => arg.push(b'\t'),
                            Some(b'b') => arg.push(8),
                            Some(b'a') => arg.push(7),
                            Some(c) => arg.push(c),
                            None => return Err(syntax("unbalanced quotes in inline command")),
                        },
                        Some(c) => arg.push(c),
                    }
                }
                if it.peek().is_some_and(|b| !b.is_ascii_whitespace()) {
                    return Err(syntax("closing quote must be followed by a space"));
                }
            }
            b'\'' => {
                it.next();
                loop {
                    match it.next() {
                        None => return Err(syntax("unbalanced quotes in inline command")),
                        Some(b'\'') => break,
                        Some(b'\\') if it.peek() == Some(&b'\'') => {
                            it.next();
                            arg.push(b'\'');
                        }
                        Some(c) => arg.push(c),
                    }
                }
                if it.peek().is_some_and(|b| !b.is_ascii_whitespace()) {
                    return Err(syntax("closing quote must be followed by a space"));
                }
            }
            _ => {
                while let Some(&c) = it.peek() {
                    if c.is_ascii_whitespace() {
                        break;
                    }
                    arg.push(c);
                    it.next();
                }
            }
        }
        out.push(arg);
    }
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Parse `<type><integer>\r\n` at `at`: the integer and the offset after the CRLF, or `None`
/// if the line is not complete.
fn line_int(buf: &[u8], at: usize) -> Result<Option<(i64, usize)>, RespError> {
    let Some(rest) = buf.get(at + 1..) else {
        return Ok(None);
    };
    let Some(cr) = rest.iter().take(32).position(|&b| b == b'\r') else {
        if rest.len() >= 32 {
            return Err(syntax("length line too long"));
        }
        return Ok(None);
    };
    match rest.get(cr + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(syntax("length line not terminated by CRLF")),
    }
    let digits = rest.get(..cr).unwrap_or_default();
    let n = parse_int(digits).ok_or_else(|| {
        syntax(format!(
            "invalid length '{}'",
            String::from_utf8_lossy(digits).escape_default()
        ))
    })?;
    Ok(Some((n, at + 1 + cr + 2)))
}

fn parse_int(d: &[u8]) -> Option<i64> {
    let (neg, digits) = match d.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, d),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut n: i64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(c - b'0');
    }
    Some(if neg { -n } else { n })
}

/// What [`ReplyScanner::scan`] found in a chunk of server output.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Bytes from the front of the chunk that can be forwarded now.
    pub consumed: usize,
    /// Replies that ended inside `consumed`: (offset just past the end, is an out-of-band push).
    pub ends: Vec<(usize, bool)>,
}

#[derive(Debug, Clone, Copy)]
struct Level {
    remaining: u64,
    /// This aggregate is an attribute (`|`): it decorates the value after it.
    attribute: bool,
}

/// Finds reply boundaries in the server's byte stream, across reads.
#[derive(Debug, Default)]
pub struct ReplyScanner {
    stack: Vec<Level>,
    /// Payload bytes (plus CRLF) of a bulk value still to come.
    skip: u64,
    /// The top-level reply in progress is a push.
    push: bool,
    /// An attribute ended at top level: the next value belongs to the same reply.
    after_attribute: bool,
}

impl ReplyScanner {
    /// Whether a reply has started but not ended.
    pub fn mid_reply(&self) -> bool {
        !self.stack.is_empty() || self.skip > 0 || self.after_attribute
    }

    /// Whether the reply in progress is an out-of-band push (RESP3 `>`).
    pub fn in_push(&self) -> bool {
        self.mid_reply() && self.push
    }

    /// Scan `chunk`. Bytes after `consumed` are an incomplete line: keep them and scan again
    /// with more data appended.
    pub fn scan(&mut self, chunk: &[u8]) -> Result<Scan, RespError> {
        let mut out = Scan::default();
        let mut pos = 0usize;
        loop {
            if self.skip > 0 {
                let avail = (chunk.len() - pos) as u64;
                let take = avail.min(self.skip);
                pos += take as usize;
                self.skip -= take;
                if self.skip > 0 {
                    out.consumed = pos;
                    return Ok(out);
                }
                self.value_done(pos, &mut out);
                continue;
            }
            out.consumed = pos;
            let Some(&t) = chunk.get(pos) else {
                return Ok(out);
            };
            let rest = chunk.get(pos + 1..).unwrap_or_default();
            let Some(lf) = rest.iter().take(MAX_LINE + 2).position(|&b| b == b'\n') else {
                if rest.len() > MAX_LINE + 1 {
                    return Err(RespError::TooLarge {
                        what: "reply line",
                        len: rest.len() as u64,
                        max: MAX_LINE as u64,
                    });
                }
                return Ok(out);
            };
            let line = rest.get(..lf).unwrap_or_default();
            let line = line
                .strip_suffix(b"\r")
                .ok_or_else(|| syntax("reply line not terminated by CRLF"))?;
            let after = pos + 1 + lf + 1;
            if self.stack.is_empty() && t != b'|' {
                self.push = t == b'>';
            }
            match t {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
                    pos = after;
                    self.value_done(pos, &mut out);
                }
                b'$' | b'=' | b'!' => {
                    let n =
                        parse_int(line).ok_or_else(|| syntax("invalid bulk length in reply"))?;
                    pos = after;
                    if n < 0 {
                        self.value_done(pos, &mut out);
                    } else {
                        self.skip = n as u64 + 2;
                    }
                }
                b'*' | b'%' | b'~' | b'>' | b'|' => {
                    let n = parse_int(line)
                        .ok_or_else(|| syntax("invalid aggregate length in reply"))?;
                    pos = after;
                    let elements = match t {
                        b'%' | b'|' => (n.max(0) as u64).saturating_mul(2),
                        _ => n.max(0) as u64,
                    };
                    if elements == 0 {
                        if t == b'|' {
                            self.attribute_done();
                        } else {
                            self.value_done(pos, &mut out);
                        }
                    } else {
                        if self.stack.len() >= MAX_DEPTH {
                            return Err(RespError::TooLarge {
                                what: "reply nesting",
                                len: self.stack.len() as u64 + 1,
                                max: MAX_DEPTH as u64,
                            });
                        }
                        self.stack.push(Level {
                            remaining: elements,
                            attribute: t == b'|',
                        });
                    }
                }
                other => {
                    return Err(syntax(format!(
                        "unknown reply type '{}'",
                        (other as char).escape_default()
                    )))
                }
            }
        }
    }

    /// A complete value ended at `pos`: pop finished aggregates; at top level, record the end.
    fn value_done(&mut self, pos: usize, out: &mut Scan) {
        loop {
            let Some(top) = self.stack.last_mut() else {
                if self.after_attribute {
                    self.after_attribute = false;
                }
                out.ends.push((pos, self.push));
                self.push = false;
                return;
            };
            top.remaining -= 1;
            if top.remaining > 0 {
                return;
            }
            let done = *top;
            self.stack.pop();
            if done.attribute {
                self.attribute_done();
                return;
            }
        }
    }

    /// An attribute map ended: the value it decorates follows as part of the same element.
    fn attribute_done(&mut self) {
        if self.stack.is_empty() {
            self.after_attribute = true;
        }
    }
}

/// Encode a command as a multibulk array.
pub fn encode_command<'a>(args: impl IntoIterator<Item = &'a [u8]>) -> Bytes {
    let args: Vec<&[u8]> = args.into_iter().collect();
    let mut out = BytesMut::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.put_u8(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.put_u8(b'$');
        out.extend_from_slice(a.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out.freeze()
}

/// An error reply. CR and LF in `text` are replaced so the reply stays one line.
pub fn error_reply(text: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 3);
    out.put_u8(b'-');
    out.extend(
        text.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// A simple-string reply (`+OK`).
pub fn simple_reply(text: &str) -> Bytes {
    Bytes::from(format!("+{text}\r\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(input: &[u8]) -> Result<Vec<Command>, RespError> {
        let mut buf = BytesMut::from(input);
        let mut s = CommandSplitter::default();
        let mut out = Vec::new();
        while let Some(c) = s.split(&mut buf, &CommandLimits::default())? {
            out.push(c);
        }
        Ok(out)
    }

    #[test]
    fn splits_pipelined_multibulk_commands_zero_copy() {
        let wire = b"*3\r\n$5\r\nLPUSH\r\n$6\r\ncelery\r\n$5\r\nhello\r\n*1\r\n$4\r\nPING\r\n";
        let cmds = split_all(wire).unwrap();
        assert_eq!(cmds.len(), 2);
        assert!(cmds[0].name().is("LPUSH"));
        assert_eq!(cmds[0].arg(1), Some(&b"celery"[..]));
        assert_eq!(cmds[0].arg(2), Some(&b"hello"[..]));
        assert_eq!(&cmds[0].raw[..], &wire[..38]);
        assert!(cmds[1].name().is("PING"));
    }

    #[test]
    fn resumes_a_command_split_across_reads_at_every_byte() {
        let wire = b"*3\r\n$5\r\nrpush\r\n$1\r\nq\r\n$11\r\nhello world\r\n";
        for cut in 0..wire.len() {
            let mut s = CommandSplitter::default();
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(s.split(&mut buf, &CommandLimits::default()).unwrap(), None);
            buf.extend_from_slice(&wire[cut..]);
            let c = s
                .split(&mut buf, &CommandLimits::default())
                .unwrap()
                .unwrap();
            assert!(c.name().is("RPUSH"));
            assert_eq!(c.arg(2), Some(&b"hello world"[..]));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn limits_are_checked_before_the_bytes_arrive() {
        let lim = CommandLimits {
            max_command: 100,
            max_args: 4,
        };
        let mut s = CommandSplitter::default();
        let mut buf = BytesMut::from(&b"*5\r\n"[..]);
        assert!(matches!(
            s.split(&mut buf, &lim),
            Err(RespError::TooLarge {
                what: "command argument count",
                ..
            })
        ));
        let mut s = CommandSplitter::default();
        let mut buf = BytesMut::from(&b"*2\r\n$4\r\nPING\r\n$999999999\r\n"[..]);
        assert!(matches!(
            s.split(&mut buf, &lim),
            Err(RespError::TooLarge {
                what: "command",
                ..
            })
        ));
        assert!(
            buf.capacity() < 1 << 20,
            "nothing reserved for a refused size"
        );
    }

    #[test]
    fn rejects_malformed_commands() {
        for bad in [
            &b"*1\r\n+PING\r\n"[..],
            b"*1\r\n$4\r\nPINGxx",
            b"*x\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n$4\nPING\r\n",
            b"*99999999999999999999\r\n",
        ] {
            assert!(
                split_all(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn inline_commands_split_like_redis() {
        let cmds = split_all(b"\r\nPING\r\nset k \"a b\\x41\\n\" 'it\\'s'\n").unwrap();
        assert_eq!(cmds.len(), 2);
        assert!(cmds[0].inline && cmds[0].name().is("PING"));
        assert_eq!(cmds[1].arg(2), Some(&b"a bA\n"[..]));
        assert_eq!(cmds[1].arg(3), Some(&b"it's"[..]));
        assert!(split_all(b"set k \"open\n").is_err());
        assert!(split_all(b"set k \"a\"b\n").is_err());
    }

    #[test]
    fn encodes_commands_and_replies() {
        let c = encode_command([&b"LPUSH"[..], b"overflow.celery", b"x"]);
        let back = split_all(&c).unwrap();
        assert_eq!(back[0].arg(1), Some(&b"overflow.celery"[..]));
        assert_eq!(
            &error_reply("SLUICE shed:\r\nx")[..],
            b"-SLUICE shed:  x\r\n"
        );
    }

    fn ends(input: &[u8]) -> Vec<(usize, bool)> {
        let mut s = ReplyScanner::default();
        let scan = s.scan(input).unwrap();
        assert_eq!(scan.consumed, input.len());
        assert!(!s.mid_reply());
        scan.ends
    }

    #[test]
    fn finds_reply_ends_resp2_and_resp3() {
        let r = b"+OK\r\n:3\r\n$5\r\nhello\r\n$-1\r\n*2\r\n$1\r\na\r\n*1\r\n:1\r\n*0\r\n-ERR x\r\n";
        assert_eq!(
            ends(r),
            vec![
                (5, false),
                (9, false),
                (20, false),
                (25, false),
                (44, false),
                (48, false),
                (56, false)
            ]
        );
        let r3 = b"%1\r\n+k\r\n~2\r\n_\r\n,1.5\r\n>3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n|1\r\n+ttl\r\n:3\r\n#t\r\n";
        let e = ends(r3);
        assert_eq!(e.len(), 3);
        assert!(!e[0].1 && e[1].1 && !e[2].1, "{e:?}");
        assert_eq!(e[2].0, r3.len());
    }

    #[test]
    fn scans_streaming_at_every_cut() {
        let r = b"*2\r\n$10\r\n0123456789\r\n%1\r\n+a\r\n:1\r\n+OK\r\n";
        let whole = ends(r);
        for cut in 0..r.len() {
            let mut s = ReplyScanner::default();
            let first = s.scan(&r[..cut]).unwrap();
            let mut rest = r[first.consumed..].to_vec();
            let second = s.scan(&rest).unwrap();
            assert_eq!(second.consumed, rest.len());
            let mut got: Vec<usize> = first.ends.iter().map(|e| e.0).collect();
            got.extend(second.ends.iter().map(|e| e.0 + first.consumed));
            assert_eq!(
                got,
                whole.iter().map(|e| e.0).collect::<Vec<_>>(),
                "cut {cut}"
            );
            rest.clear();
        }
    }

    #[test]
    fn big_bulk_replies_stream_without_buffering() {
        let mut s = ReplyScanner::default();
        let scan = s.scan(b"$1000000\r\nabc").unwrap();
        assert_eq!(scan.consumed, 13);
        assert!(scan.ends.is_empty() && s.mid_reply());
        let body = vec![b'x'; 999_997];
        assert_eq!(s.scan(&body).unwrap().consumed, body.len());
        let end = s.scan(b"\r\n+OK\r\n").unwrap();
        assert_eq!(end.ends, vec![(2, false), (7, false)]);
    }

    #[test]
    fn rejects_bad_replies_and_deep_nesting() {
        assert!(ReplyScanner::default().scan(b"?x\r\n").is_err());
        assert!(ReplyScanner::default().scan(b"+OK\n").is_err());
        let deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
        assert!(ReplyScanner::default().scan(&deep).is_err());
    }
}
