//! Just enough JSON and base64 for etcd's v3 JSON gateway (pure, no I/O).
//!
//! The gateway speaks protobuf-as-JSON: 64-bit integers arrive as strings,
//! keys and values as base64, and a watch is a stream of JSON objects. The
//! crate has no JSON dependency of its own, so this module holds a small,
//! strict parser ([`parse`]), a splitter that cuts a byte stream into complete
//! top-level values ([`Splitter`]), string escaping for the few requests we
//! write, and standard base64 with padding.

use std::fmt::Write as _;

/// A parsed JSON value. Numbers keep their text so 64-bit integers survive.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Number(String),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

/// Nesting deeper than this is refused (the gateway never nests past ~6).
const MAX_DEPTH: usize = 64;

impl Json {
    /// The member `name` of an object.
    pub(crate) fn get(&self, name: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == name).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    /// An integer written either as a number or as a string (protobuf's
    /// JSON mapping of int64): for etcd's int64 fields only (revisions,
    /// lease IDs, TTLs). A uint64 field (member IDs such as the status's
    /// `leader`, `raft_term`) needs [`Json::as_u64`]: half of its values
    /// are past `i64::MAX`, and this gives `None` for them.
    pub(crate) fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Number(n) | Json::String(n) => n.parse().ok(),
            _ => None,
        }
    }

    /// An unsigned integer written either as a number or as a string
    /// (protobuf's JSON mapping of uint64), all 64 bits of it: etcd's
    /// member IDs are hashes, as likely to be at or above 2^63 as below.
    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) | Json::String(n) => n.parse().ok(),
            _ => None,
        }
    }

    pub(crate) fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub(crate) fn as_array(&self) -> &[Json] {
        match self {
            Json::Array(items) => items,
            _ => &[],
        }
    }
}

/// Parses one complete JSON text (surrounding whitespace allowed).
pub(crate) fn parse(text: &[u8]) -> Result<Json, String> {
    let mut p = Parser { s: text, i: 0 };
    let value = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing bytes at offset {}", p.i));
    }
    Ok(value)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    fn err(&self, what: &str) -> String {
        format!("{what} at offset {}", self.i)
    }

    fn eat(&mut self, literal: &[u8]) -> bool {
        if self
            .s
            .get(self.i..)
            .is_some_and(|rest| rest.starts_with(literal))
        {
            self.i += literal.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        self.ws();
        match self.s.get(self.i) {
            None => Err(self.err("unexpected end")),
            Some(b'{') => {
                self.i += 1;
                let mut members = Vec::new();
                self.ws();
                if self.eat(b"}") {
                    return Ok(Json::Object(members));
                }
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'"') {
                        return Err(self.err("expected a member name"));
                    }
                    let name = self.string()?;
                    self.ws();
                    if !self.eat(b":") {
                        return Err(self.err("expected ':'"));
                    }
                    let value = self.value(depth + 1)?;
                    members.push((name, value));
                    self.ws();
                    if self.eat(b",") {
                        continue;
                    }
                    if self.eat(b"}") {
                        return Ok(Json::Object(members));
                    }
                    return Err(self.err("expected ',' or '}'"));
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat(b"]") {
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    if self.eat(b",") {
                        continue;
                    }
                    if self.eat(b"]") {
                        return Ok(Json::Array(items));
                    }
                    return Err(self.err("expected ',' or ']'"));
                }
            }
            Some(b'"') => self.string().map(Json::String),
            Some(b't') if self.eat(b"true") => Ok(Json::Bool(true)),
            Some(b'f') if self.eat(b"false") => Ok(Json::Bool(false)),
            Some(b'n') if self.eat(b"null") => Ok(Json::Null),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.i;
                while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') = self.s.get(self.i)
                {
                    self.i += 1;
                }
                let digits = self.s.get(start..self.i).unwrap_or_default();
                let text = std::str::from_utf8(digits).unwrap_or_default();
                if text.parse::<f64>().is_err() {
                    return Err(self.err("bad number"));
                }
                Ok(Json::Number(text.to_string()))
            }
            Some(_) => Err(self.err("unexpected character")),
        }
    }

    /// A string starting at the opening quote.
    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            let Some(&b) = self.s.get(self.i) else {
                return Err(self.err("unterminated string"));
            };
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else {
                        return Err(self.err("unterminated escape"));
                    };
                    self.i += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            if (0xD800..0xDC00).contains(&hi) {
                                if !self.eat(b"\\u") {
                                    return Err(self.err("lone surrogate"));
                                }
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(self.err("bad surrogate pair"));
                                }
                                let code = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                                char::from_u32(code).ok_or_else(|| self.err("bad code point"))?
                            } else {
                                char::from_u32(hi).ok_or_else(|| self.err("lone surrogate"))?
                            }
                        }
                        _ => return Err(self.err("unknown escape")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                0..=0x1f => return Err(self.err("control character in string")),
                _ => out.push(b),
            }
        }
        String::from_utf8(out).map_err(|_| self.err("string is not UTF-8"))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self
            .s
            .get(self.i..self.i + 4)
            .ok_or_else(|| self.err("short \\u escape"))?;
        let text = std::str::from_utf8(digits).map_err(|_| self.err("bad \\u escape"))?;
        let code = u32::from_str_radix(text, 16).map_err(|_| self.err("bad \\u escape"))?;
        self.i += 4;
        Ok(code)
    }
}

/// Cuts a stream of bytes into complete top-level JSON objects or arrays,
/// however the bytes are chunked (the watch stream separates them with
/// newlines, but nothing here relies on it).
#[derive(Default)]
pub(crate) struct Splitter {
    buf: Vec<u8>,
    /// Where the value being scanned starts in `buf` (the separators
    /// before it are skipped, and dropped from `buf` once per call rather
    /// than once per byte: a flood of whitespace stays linear).
    start: usize,
    /// How far `buf` has been scanned, and the scanner's state there.
    scanned: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl Splitter {
    /// Largest single value accepted; a longer one is a broken stream.
    pub(crate) const MAX_VALUE: usize = 16 * 1024 * 1024;

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete value's bytes, if one is buffered.
    pub(crate) fn next_value(&mut self) -> Result<Option<Vec<u8>>, String> {
        while self.scanned < self.buf.len() {
            let b = self.buf[self.scanned]; // `scanned < buf.len()`: the loop condition
            self.scanned += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    if self.depth == 0 {
                        return Err("unbalanced '}' or ']' in the stream".into());
                    }
                    self.depth -= 1;
                    if self.depth == 0 {
                        // `start <= scanned <= buf.len()`: `start` only
                        // moves up to `scanned`.
                        let value = self.buf[self.start..self.scanned].to_vec();
                        self.buf.drain(..self.scanned);
                        self.scanned = 0;
                        self.start = 0;
                        return Ok(Some(value));
                    }
                }
                // Separators between values: skipped.
                b' ' | b'\t' | b'\r' | b'\n' if self.depth == 0 => self.start = self.scanned,
                _ if self.depth == 0 => return Err("a stream value is not an object".into()),
                _ => {}
            }
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        if self.buf.len() > Self::MAX_VALUE {
            return Err(format!("a stream value exceeds {} bytes", Self::MAX_VALUE));
        }
        Ok(None)
    }
}

/// `s` as a JSON string literal, quotes included.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        // `chunks` never yields an empty chunk, so `chunk[0]` exists.
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional).
pub(crate) fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return Err(format!("invalid base64 character {:?}", c as char)),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_gateway_sends() {
        let text = br#"{"result":{"header":{"revision":"12","raft_term":"2"},
            "events":[{"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"3"}}],
            "created":true,"n":-1.5e3,"z":null}}"#;
        let v = parse(text).unwrap();
        let result = v.get("result").unwrap();
        assert_eq!(
            result
                .get("header")
                .unwrap()
                .get("revision")
                .unwrap()
                .as_i64(),
            Some(12)
        );
        let events = result.get("events").unwrap().as_array();
        assert_eq!(events[0].get("type").unwrap().as_str(), Some("DELETE"));
        assert_eq!(result.get("created").unwrap().as_bool(), Some(true));
        assert_eq!(result.get("z"), Some(&Json::Null));
        assert_eq!(result.get("n"), Some(&Json::Number("-1.5e3".into())));
    }

    /// etcd's uint64 fields (member IDs) use all 64 bits: `as_u64` reads
    /// them whole, where `as_i64` (for int64 fields) cannot.
    #[test]
    fn uint64_fields_are_read_past_i64_max() {
        let v = parse(br#"{"leader":"11046527456118344142","max":18446744073709551615}"#).unwrap();
        let leader = v.get("leader").unwrap();
        assert_eq!(leader.as_u64(), Some(11_046_527_456_118_344_142));
        assert_eq!(leader.as_i64(), None, "past i64::MAX");
        assert_eq!(v.get("max").unwrap().as_u64(), Some(u64::MAX));
        assert_eq!(Json::String("7".into()).as_u64(), Some(7));
        for bad in ["-1", "18446744073709551616", "", "x"] {
            assert_eq!(Json::String(bad.into()).as_u64(), None, "{bad:?}");
        }
    }

    #[test]
    fn strings_round_trip_through_quote() {
        for s in ["plain", "q\"uote\\", "nl\n\ttab\u{1}", "é ☃ 😀"] {
            assert_eq!(parse(quote(s).as_bytes()).unwrap(), Json::String(s.into()));
        }
        assert_eq!(
            parse(br#""\ud83d\ude00\u00e9""#).unwrap(),
            Json::String("😀é".into())
        );
    }

    #[test]
    fn rejects_broken_input() {
        for bad in [
            &b"{"[..],
            b"{\"a\" 1}",
            b"[1,]",
            b"\"\\ud800\"",
            b"{} x",
            b"tru",
            b"\"a\nb\"",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn splitter_handles_any_chunking() {
        let stream = b"{\"a\":\"}{\\\"\"}\n{\"b\":[1,{\"c\":2}]}\n  {\"d\":3}";
        for size in 1..stream.len() {
            let mut s = Splitter::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(size) {
                s.push(chunk);
                while let Some(v) = s.next_value().unwrap() {
                    got.push(parse(&v).unwrap());
                }
            }
            assert_eq!(got.len(), 3, "chunk size {size}");
            assert_eq!(got[0].get("a").unwrap().as_str(), Some("}{\""));
            assert_eq!(got[2].get("d").unwrap().as_i64(), Some(3));
        }
        let mut s = Splitter::default();
        s.push(b"]");
        assert!(s.next_value().is_err());
    }

    /// Whitespace between values is skipped in linear time (it used to be
    /// drained from the buffer once per byte: some 20 s for this flood in a
    /// debug build, quadrupling with each doubling).
    #[test]
    fn splitter_skips_a_whitespace_flood_in_linear_time() {
        let mut s = Splitter::default();
        let started = std::time::Instant::now();
        s.push(&vec![b' '; 2 * 1024 * 1024]);
        assert_eq!(s.next_value(), Ok(None));
        assert!(s.buf.is_empty(), "the separators are dropped");
        s.push(&vec![b'\n'; 2 * 1024 * 1024]);
        s.push(b"{\"a\":1}  ");
        assert_eq!(s.next_value(), Ok(Some(b"{\"a\":1}".to_vec())));
        assert_eq!(s.next_value(), Ok(None));
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        assert!(base64_decode("a*b").is_err());
    }
}
