//! A few RESP commands sent straight to Redis (or through a proxy) on a fresh connection:
//! `PING` to check a target relays, `DEL` and `LLEN` around each leg, `INFO` for the version.
//! Only the reply types these commands get are read: simple strings, errors, integers and bulk
//! strings.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`.
    Simple(String),
    /// `:42`.
    Integer(i64),
    /// `$n` followed by n bytes, or `$-1` (`None`).
    Bulk(Option<Vec<u8>>),
}

/// The RESP encoding of a command.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Read one reply; a Redis error reply becomes an `Err` with its text.
pub fn read_reply(r: &mut impl BufRead) -> Result<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("connection closed before a reply");
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at_checked(1).context("empty reply line")?;
    match kind {
        "+" => Ok(Reply::Simple(rest.to_string())),
        "-" => bail!("Redis answered: {rest}"),
        ":" => Ok(Reply::Integer(
            rest.parse()
                .with_context(|| format!("bad integer reply {rest:?}"))?,
        )),
        "$" => {
            let n: i64 = rest
                .parse()
                .with_context(|| format!("bad bulk length {rest:?}"))?;
            if n < 0 {
                return Ok(Reply::Bulk(None));
            }
            let n = usize::try_from(n).context("bulk length")?;
            if n > 64 << 20 {
                bail!("bulk reply of {n} bytes: too large");
            }
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf)?;
            buf.truncate(n);
            Ok(Reply::Bulk(Some(buf)))
        }
        _ => bail!("unexpected reply {line:?}"),
    }
}

/// Send one command to `addr` on a new connection and read its reply.
pub fn command(addr: &str, args: &[&[u8]]) -> Result<Reply> {
    let sa = addr
        .to_socket_addrs()
        .with_context(|| format!("resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(5))
        .with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&encode(args))?;
    let mut r = BufReader::new(s);
    read_reply(&mut r).with_context(|| {
        format!(
            "{} on {addr}",
            String::from_utf8_lossy(args.first().copied().unwrap_or_default())
        )
    })
}

/// `PING` → `PONG`.
pub fn ping(addr: &str) -> Result<()> {
    match command(addr, &[b"PING"])? {
        Reply::Simple(s) if s == "PONG" => Ok(()),
        other => bail!("PING on {addr} answered {other:?}"),
    }
}

/// `DEL key`.
pub fn del(addr: &str, key: &str) -> Result<()> {
    match command(addr, &[b"DEL", key.as_bytes()])? {
        Reply::Integer(_) => Ok(()),
        other => bail!("DEL {key} on {addr} answered {other:?}"),
    }
}

/// `LLEN key`.
pub fn llen(addr: &str, key: &str) -> Result<u64> {
    match command(addr, &[b"LLEN", key.as_bytes()])? {
        Reply::Integer(n) => Ok(u64::try_from(n).unwrap_or(0)),
        other => bail!("LLEN {key} on {addr} answered {other:?}"),
    }
}

/// A field of `INFO section`, e.g. `redis_version` of `server`.
pub fn info_field(addr: &str, section: &str, field: &str) -> Result<String> {
    match command(addr, &[b"INFO", section.as_bytes()])? {
        Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b)
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("no {field} in INFO {section}")),
        other => bail!("INFO {section} on {addr} answered {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Result<Reply> {
        read_reply(&mut BufReader::new(bytes))
    }

    #[test]
    fn encodes_and_reads_replies() {
        assert_eq!(
            encode(&[b"DEL", b"mylist"]),
            b"*2\r\n$3\r\nDEL\r\n$6\r\nmylist\r\n"
        );
        assert_eq!(read(b"+PONG\r\n").unwrap(), Reply::Simple("PONG".into()));
        assert_eq!(read(b":42\r\n").unwrap(), Reply::Integer(42));
        assert_eq!(
            read(b"$3\r\nabc\r\n").unwrap(),
            Reply::Bulk(Some(b"abc".to_vec()))
        );
        assert_eq!(read(b"$-1\r\n").unwrap(), Reply::Bulk(None));
    }

    #[test]
    fn bad_replies_are_errors() {
        for bad in [
            &b""[..],
            b"\r\n",
            b"-ERR nope\r\n",
            b":x\r\n",
            b"$5\r\nab",
            b"$99999999999\r\n",
            b"*1\r\n",
            b"\xff\xfe\r\n",
        ] {
            assert!(read(bad).is_err(), "{bad:?}");
        }
    }
}
