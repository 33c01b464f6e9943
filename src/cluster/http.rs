//! A minimal blocking HTTP/1.1 client for etcd's JSON gateway.
//!
//! Only what the gateway needs: `POST` with a JSON body over plain TCP, one
//! connection per request (`Connection: close`), responses framed by
//! `Content-Length`, `Transfer-Encoding: chunked` or the end of the stream.
//!
//! # Why not an HTTP crate
//!
//! The watch is a response that never ends. Its reader thread must notice
//! within a bounded time that it was asked to stop, and that etcd went
//! silent, so it needs a per-read timeout on the socket it owns. Blocking
//! HTTP crates (ureq 3) offer only whole-body timeouts and do not expose the
//! socket; the protocol subset here is small and the chunk decoder is a pure,
//! unit-tested state machine.

use super::resolve;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Largest response head (status line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest unary response body accepted.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Extra request headers, as `(name, value)`.
pub(crate) type Headers<'a> = &'a [(&'a str, &'a str)];

/// Sends `POST path` with a JSON `body` (and `headers`) to `host`
/// ("host:port") and reads the whole response, all within `timeout`.
/// Returns the status and the body.
pub(crate) fn post(
    host: &str,
    path: &str,
    headers: Headers<'_>,
    body: &str,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let deadline = Instant::now() + timeout;
    let (mut sock, status, head) = send(host, path, headers, body, deadline)?;
    let mut reader = BodyReader::new(head)?;
    let mut out = reader.take_buffered()?;
    let mut buf = [0u8; 16 * 1024];
    while !reader.done() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete response from {host} within {timeout:?}"
            ));
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match sock.read(&mut buf) {
            Ok(0) => reader.eof()?,
            Ok(n) => reader.feed(&buf[..n], &mut out)?,
            Err(e) if is_timeout(&e) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the response from {host}: {e}")),
        }
        if out.len() > MAX_BODY {
            return Err(format!("response from {host} exceeds {MAX_BODY} bytes"));
        }
    }
    Ok((status, out))
}

/// A response body read piece by piece as it arrives (the watch stream).
pub(crate) struct Stream {
    sock: TcpStream,
    reader: BodyReader,
    first: Option<Vec<u8>>,
}

/// What one [`Stream::read`] saw.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Read1 {
    /// Some body bytes were appended (possibly zero, e.g. a chunk header).
    Data,
    /// Nothing arrived within the poll interval.
    Idle,
    /// The body ended.
    End,
}

impl Stream {
    /// Sends `POST path` (with `headers`) and waits (up to `timeout`) for a
    /// 2xx response head; later reads wait at most `poll` each.
    pub(crate) fn open(
        host: &str,
        path: &str,
        headers: Headers<'_>,
        body: &str,
        timeout: Duration,
        poll: Duration,
    ) -> Result<Stream, String> {
        let (sock, status, head) = send(host, path, headers, body, Instant::now() + timeout)?;
        if !(200..300).contains(&status) {
            return Err(format!("{host} answered {path} with HTTP {status}"));
        }
        sock.set_read_timeout(Some(poll))
            .map_err(|e| e.to_string())?;
        let mut reader = BodyReader::new(head)?;
        let first = reader.take_buffered()?;
        Ok(Stream {
            sock,
            reader,
            first: Some(first),
        })
    }

    /// Reads what arrives within the poll interval into `out`.
    pub(crate) fn read(&mut self, out: &mut Vec<u8>) -> Result<Read1, String> {
        if let Some(first) = self.first.take() {
            out.extend_from_slice(&first);
            return Ok(Read1::Data);
        }
        if self.reader.done() {
            return Ok(Read1::End);
        }
        let mut buf = [0u8; 16 * 1024];
        match self.sock.read(&mut buf) {
            Ok(0) => {
                self.reader.eof()?;
                Ok(Read1::End)
            }
            Ok(n) => {
                self.reader.feed(&buf[..n], out)?;
                Ok(Read1::Data)
            }
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => Ok(Read1::Idle),
            Err(e) => Err(format!("reading the stream: {e}")),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Connects, writes the request and reads the response head. Returns the
/// socket, the status and the head's bytes (with whatever body bytes came
/// along after it).
fn send(
    host: &str,
    path: &str,
    headers: Headers<'_>,
    body: &str,
    deadline: Instant,
) -> Result<(TcpStream, u16, Head), String> {
    // Bounded by `deadline` (a kept answer when the resolver is slow or
    // failing): `getaddrinfo` on this thread could not be.
    let addrs = resolve::resolve(host, deadline)?;
    let mut last = format!("{host} resolved to no address");
    let mut sock = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    let mut sock = sock.ok_or(last)?;
    let _ = sock.set_nodelay(true);
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         {extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    sock.set_write_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    sock.write_all(request.as_bytes())
        .map_err(|e| format!("sending {path} to {host}: {e}"))?;

    let mut raw = Vec::new();
    let mut buf = [0u8; 8 * 1024];
    loop {
        if let Some(end) = find(&raw, b"\r\n\r\n") {
            // In bounds: `find` matched 4 bytes at `end`, so `end + 4 <= raw.len()`.
            let head = parse_head(&raw[..end + 4])?;
            let rest = raw.split_off(end + 4);
            return Ok((
                sock,
                head.status,
                Head {
                    framing: head.framing,
                    rest,
                },
            ));
        }
        if raw.len() > MAX_HEAD {
            return Err(format!(
                "response head from {host} exceeds {MAX_HEAD} bytes"
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{host} did not answer {path} in time"));
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match sock.read(&mut buf) {
            Ok(0) => return Err(format!("{host} closed the connection before answering")),
            Ok(n) => raw.extend_from_slice(&buf[..n]), // `read` returns n <= buf.len()
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the response head from {host}: {e}")),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// How the body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilEof,
}

struct ParsedHead {
    status: u16,
    framing: Framing,
}

struct Head {
    framing: Framing,
    /// Body bytes that arrived with the head.
    rest: Vec<u8>,
}

fn parse_head(head: &[u8]) -> Result<ParsedHead, String> {
    let text = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x response: {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut framing = Framing::UntilEof;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            if value.to_ascii_lowercase().contains("chunked") {
                framing = Framing::Chunked;
            }
        } else if name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            let n = value
                .parse::<usize>()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            framing = Framing::Length(n);
        }
    }
    Ok(ParsedHead { status, framing })
}

/// Turns received bytes into body bytes according to the framing.
struct BodyReader {
    framing: Framing,
    chunks: ChunkDecoder,
    /// Body bytes still expected with `Framing::Length`.
    remaining: usize,
    pending: Vec<u8>,
    finished: bool,
}

impl BodyReader {
    fn new(head: Head) -> Result<BodyReader, String> {
        let remaining = match head.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Ok(BodyReader {
            framing: head.framing,
            chunks: ChunkDecoder::default(),
            remaining,
            pending: head.rest,
            finished: head.framing == Framing::Length(0),
        })
    }

    /// Decodes the bytes that came with the head.
    fn take_buffered(&mut self) -> Result<Vec<u8>, String> {
        let pending = std::mem::take(&mut self.pending);
        let mut out = Vec::new();
        self.feed(&pending, &mut out)?;
        Ok(out)
    }

    fn done(&self) -> bool {
        self.finished
    }

    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        match self.framing {
            Framing::Length(_) => {
                // `take` is at most both lengths: no panic, no underflow.
                let take = bytes.len().min(self.remaining);
                out.extend_from_slice(&bytes[..take]);
                self.remaining -= take;
                self.finished = self.remaining == 0;
            }
            Framing::Chunked => {
                self.chunks.feed(bytes, out)?;
                self.finished = self.chunks.done();
            }
            Framing::UntilEof => out.extend_from_slice(bytes),
        }
        Ok(())
    }

    fn eof(&mut self) -> Result<(), String> {
        if self.framing == Framing::UntilEof {
            self.finished = true;
            Ok(())
        } else if self.finished {
            Ok(())
        } else {
            Err("the connection closed in the middle of the response body".into())
        }
    }
}

/// A resumable decoder of `Transfer-Encoding: chunked`.
#[derive(Debug, Default)]
struct ChunkDecoder {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line.
    #[default]
    Size,
    /// Copying this many data bytes.
    Data(usize),
    /// Skipping the CRLF after a chunk's data.
    DataEnd,
    /// Reading trailer lines after the last (zero-size) chunk.
    Trailer,
    Done,
}

impl ChunkDecoder {
    const MAX_LINE: usize = 4096;

    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        while !bytes.is_empty() {
            match self.state {
                ChunkState::Done => return Ok(()),
                ChunkState::Data(n) => {
                    // `take <= bytes.len()`, and `n - take` runs only when `take < n`.
                    let take = n.min(bytes.len());
                    out.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    self.state = if take == n {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(n - take)
                    };
                }
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailer => {
                    let b = bytes[0]; // the loop runs while `bytes` is not empty
                    bytes = &bytes[1..];
                    if b != b'\n' {
                        self.line.push(b);
                        if self.line.len() > Self::MAX_LINE {
                            return Err("chunk framing line too long".into());
                        }
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.state = match self.state {
                        ChunkState::DataEnd if line.is_empty() => ChunkState::Size,
                        ChunkState::DataEnd => return Err("missing CRLF after chunk data".into()),
                        ChunkState::Trailer if line.is_empty() => ChunkState::Done,
                        ChunkState::Trailer => ChunkState::Trailer,
                        _ => {
                            let text = std::str::from_utf8(line).unwrap_or_default();
                            let hex = text.split(';').next().unwrap_or_default().trim();
                            let size = usize::from_str_radix(hex, 16)
                                .map_err(|_| format!("bad chunk size {text:?}"))?;
                            if size == 0 {
                                ChunkState::Trailer
                            } else {
                                ChunkState::Data(size)
                            }
                        }
                    };
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode_under_any_split() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for size in 1..wire.len() {
            let mut d = ChunkDecoder::default();
            let mut out = Vec::new();
            for piece in wire.chunks(size) {
                d.feed(piece, &mut out).unwrap();
            }
            assert_eq!(out, b"hello, world", "split {size}");
            assert!(d.done());
        }
        let mut d = ChunkDecoder::default();
        assert!(d.feed(b"zz\r\n", &mut Vec::new()).is_err());
        let mut d = ChunkDecoder::default();
        assert!(d.feed(b"2\r\nabXY\r\n", &mut Vec::new()).is_err());
    }

    #[test]
    fn heads_give_status_and_framing() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!((h.status, h.framing), (200, Framing::Chunked));
        let h = parse_head(b"HTTP/1.1 404 Not Found\r\ncontent-length: 12\r\n\r\n").unwrap();
        assert_eq!((h.status, h.framing), (404, Framing::Length(12)));
        let h = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap();
        assert_eq!(h.framing, Framing::UntilEof);
        assert!(parse_head(b"SSH-2.0-x\r\n\r\n").is_err());
    }

    /// A one-shot server on loopback: accepts one connection, reads a
    /// request up to its `{}` body and answers with `reply`. Dropped (also
    /// when the test fails before its client connected), it wakes the
    /// `accept` with a connection of its own and joins the thread.
    struct OneShot {
        host: String,
        thread: Option<std::thread::JoinHandle<Vec<u8>>>,
    }

    impl OneShot {
        /// Waits for the server to finish: the request it read.
        fn request(mut self) -> Vec<u8> {
            self.thread.take().unwrap().join().unwrap()
        }
    }

    impl Drop for OneShot {
        fn drop(&mut self) {
            if let Some(thread) = self.thread.take() {
                let _ = std::net::TcpStream::connect(&self.host);
                // Its panic (if any) fails the test through `request`; here
                // the test is over or failing already.
                let _ = thread.join();
            }
        }
    }

    /// Reads by the one-shot server give up after this: a client that
    /// stalls cannot keep its thread alive.
    const SERVE_READ_TIMEOUT: Duration = Duration::from_secs(5);

    fn serve_once(reply: &'static [u8]) -> OneShot {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let thread = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(SERVE_READ_TIMEOUT)).unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while find(&req, b"{}").is_none() {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return req,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            s.write_all(reply).unwrap();
            req
        });
        OneShot {
            host,
            thread: Some(thread),
        }
    }

    #[test]
    fn post_reads_a_whole_response() {
        let server = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"ok\":true}");
        let (status, body) = post(
            &server.host,
            "/v3/x",
            &[("X-A", "1")],
            "{}",
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"{\"ok\":true}"[..]));
        let request = String::from_utf8(server.request()).unwrap();
        assert!(request.starts_with("POST /v3/x HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("Content-Length: 2\r\n"), "{request}");
        assert!(request.contains("\r\nX-A: 1\r\n"), "{request}");
    }

    #[test]
    fn a_stream_yields_data_then_end() {
        let server = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        );
        let mut s = Stream::open(
            &server.host,
            "/v3/watch",
            &[],
            "{}",
            Duration::from_secs(5),
            Duration::from_millis(50),
        )
        .unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.read(&mut out).unwrap() != Read1::End {
            assert!(Instant::now() < deadline, "stream did not end");
        }
        assert_eq!(out, b"abcde");
        let request = String::from_utf8(server.request()).unwrap();
        assert!(
            request.starts_with("POST /v3/watch HTTP/1.1\r\n"),
            "{request}"
        );
    }

    #[test]
    fn a_refused_connection_is_an_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = post(
            &format!("127.0.0.1:{port}"),
            "/",
            &[],
            "{}",
            Duration::from_secs(2),
        )
        .unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
    }
}
