//! MessagePack bodies: whole-frame encoders and body decoders.
//!
//! Typed values (call arguments, results) are encoded with `rmp-serde`'s
//! default serializer: structs as arrays of their fields in declaration order,
//! unit enum variants as their name, other variants as a one-entry map
//! `{name: value}`, `Option::None` and `()` as nil, `Vec<u8>` as an array of
//! integers (`serde_bytes` gives a MessagePack bin). `docs/PROTOCOL.md` lists
//! the whole mapping.
//!
//! Every `encode_*` function returns a whole frame, header included: the body
//! is written right after a 20-byte placeholder that is patched once the body
//! length is known, so nothing is copied twice.

use serde::Serialize;

use super::{CloseStatus, HEADER_LEN, Header, Kind, ResponseStatus, frame_pool};

/// Deepest nesting of arrays and maps accepted in request `args`.
const MAX_ARGS_DEPTH: usize = 512;
/// Longest error message or close reason sent, in bytes; longer texts are cut
/// at a char boundary so that the frame stays far below any sane
/// `max_frame_len` and never kills the connection it explains.
const MAX_TEXT_LEN: usize = 64 * 1024;
/// Names of the four string fields of a request body, in wire order.
const REQUEST_FIELDS: [&str; 4] = ["service", "version", "group", "method"];

/// A request body that breaks the protocol.
///
/// The receiver answers it with a Close frame (status ProtocolError) whose
/// reason is this error's `Display`, then closes the connection.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body is empty or does not start with a MessagePack array.
    #[error(
        "request body must be a MessagePack array of 5 elements [service, version, group, method, args]"
    )]
    NotArray,
    /// The body is an array of the wrong length.
    #[error("request body must be an array of 5 elements, got {0}")]
    WrongArity(u32),
    /// One of the first four elements is not a complete str of valid UTF-8.
    #[error("request field `{field}` must be a MessagePack str of valid UTF-8")]
    NotString {
        /// `"service"`, `"version"`, `"group"` or `"method"`.
        field: &'static str,
    },
    /// The fifth element is not one well-formed MessagePack value.
    #[error("request args are not a well-formed MessagePack value: {0}")]
    BadArgs(String),
    /// Bytes follow the args value inside the body.
    #[error("request body has {0} trailing bytes after the args value")]
    TrailingBytes(usize),
}

/// A decoded Request or OneWay body, borrowing from the frame body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBody<'a> {
    /// Service name.
    pub service: &'a str,
    /// Service version; `""` when unversioned.
    pub version: &'a str,
    /// Service group; `""` for the default group.
    pub group: &'a str,
    /// Method name.
    pub method: &'a str,
    /// The raw MessagePack bytes of the arguments (one well-formed value),
    /// ready for `rmp_serde::from_slice`.
    pub args: &'a [u8],
}

/// Encodes a whole Request or OneWay frame: header and body
/// `[service, version, group, method, args]`.
///
/// # Errors
///
/// The error of serializing `args`; an `rmp_serde::encode::Error::Syntax`
/// when `kind` is neither [`Kind::Request`] nor [`Kind::OneWay`], or when a
/// string or the body is longer than `u32::MAX` bytes.
///
/// # Example
///
/// ```
/// use pulse::protocol::{decode_request_body, encode_request, Kind, HEADER_LEN};
///
/// let frame = encode_request(Kind::Request, 1, "demo", "", "", "ping", &7u64)?;
/// let body = decode_request_body(&frame[HEADER_LEN..]).expect("just encoded");
/// assert_eq!((body.service, body.method, body.args), ("demo", "ping", &[7u8][..]));
/// # Ok::<(), rmp_serde::encode::Error>(())
/// ```
pub fn encode_request<A: Serialize + ?Sized>(
    kind: Kind,
    id: u64,
    service: &str,
    version: &str,
    group: &str,
    method: &str,
    args: &A,
) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    if !matches!(kind, Kind::Request | Kind::OneWay) {
        return Err(syntax(format!(
            "encode_request: kind must be Request or OneWay, got {kind:?}"
        )));
    }
    let strings = [service, version, group, method];
    let hint = strings.iter().map(|s| s.len() + 5).sum::<usize>() + 1 + VALUE_ROOM;
    let mut out = start_frame(hint);
    out.push(0x95); // fixarray of 5
    for (field, value) in REQUEST_FIELDS.into_iter().zip(strings) {
        if !write_str(&mut out, value) {
            return Err(syntax(format!(
                "request field `{field}` is longer than u32::MAX bytes"
            )));
        }
    }
    args.serialize(&mut rmp_serde::Serializer::new(frame_pool::Growing(
        &mut out,
    )))?;
    finish_frame(out, kind, 0, id)
}

/// Decodes a Request or OneWay body.
///
/// The body must be a MessagePack array of exactly 5 elements: four str of
/// valid UTF-8, then exactly one well-formed MessagePack value (nested at most
/// 512 arrays/maps deep) that ends exactly at the end of the body. The args
/// value is checked for structure only; whether it fits the method's parameter
/// type is decided when the handler deserializes it.
///
/// # Errors
///
/// The first [`BodyError`] found, in wire order.
pub fn decode_request_body(body: &[u8]) -> Result<RequestBody<'_>, BodyError> {
    let mut cur = Cursor::new(body);
    let arity = match cur.u8() {
        Some(marker @ 0x90..=0x9f) => u32::from(marker & 0x0f),
        Some(0xdc) => cur.be_u16().map(u32::from).ok_or(BodyError::NotArray)?,
        Some(0xdd) => cur.be_u32().ok_or(BodyError::NotArray)?,
        _ => return Err(BodyError::NotArray),
    };
    if arity != 5 {
        return Err(BodyError::WrongArity(arity));
    }
    let [service, version, group, method] = REQUEST_FIELDS.map(|field| {
        let s = read_str(&mut cur).and_then(|raw| std::str::from_utf8(raw).ok());
        s.ok_or(BodyError::NotString { field })
    });
    let (service, version, group, method) = (service?, version?, group?, method?);
    let args = request_args(cur.rest())?;
    Ok(RequestBody {
        service,
        version,
        group,
        method,
        args,
    })
}

/// The arguments of a request body, given what follows its four strings:
/// exactly one well-formed value (see [`decode_request_body`]) that fills it.
pub(crate) fn request_args(rest: &[u8]) -> Result<&[u8], BodyError> {
    let args_len = skip_value(rest, MAX_ARGS_DEPTH).map_err(BodyError::BadArgs)?;
    let (args, trailing) = rest.split_at(args_len.min(rest.len()));
    if !trailing.is_empty() {
        return Err(BodyError::TrailingBytes(trailing.len()));
    }
    Ok(args)
}

/// Encodes a whole Response frame with status Ok whose body is `result`.
///
/// # Errors
///
/// The error of serializing `result`; an `rmp_serde::encode::Error::Syntax`
/// when the body is longer than `u32::MAX` bytes.
pub fn encode_ok_response<R: Serialize + ?Sized>(
    id: u64,
    result: &R,
) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    let mut out = start_frame(VALUE_ROOM);
    result.serialize(&mut rmp_serde::Serializer::new(frame_pool::Growing(
        &mut out,
    )))?;
    finish_frame(out, Kind::Response, ResponseStatus::Ok as u8, id)
}

/// Encodes a whole Response frame with a non-Ok `status` and a str body.
///
/// `message` is cut to 64 KiB (at a char boundary). Passing
/// [`ResponseStatus::Ok`] produces a frame whose result is the str `message`.
pub fn encode_error_response(id: u64, status: ResponseStatus, message: &str) -> Vec<u8> {
    text_frame(Kind::Response, status as u8, id, message, MAX_TEXT_LEN)
}

/// [`encode_error_response`] with the body kept within `max_body` bytes too
/// (a receiver's `max_frame_len` may be as small as 64): `message` is cut to
/// `max_body` less the 5 bytes of its longest str marker.
pub(crate) fn encode_error_response_within(
    id: u64,
    status: ResponseStatus,
    message: &str,
    max_body: u32,
) -> Vec<u8> {
    let max_text = MAX_TEXT_LEN.min((max_body as usize).saturating_sub(5));
    text_frame(Kind::Response, status as u8, id, message, max_text)
}

/// Encodes a whole Ping frame carrying sequence `seq`, empty body, from a
/// side that sends heartbeat Pings (status 0).
pub fn encode_ping(seq: u64) -> Vec<u8> {
    encode_ping_from(seq, true)
}

/// Encodes a whole Pong frame answering the Ping with sequence `seq`, empty
/// body, from a side that sends heartbeat Pings (status 0).
pub fn encode_pong(seq: u64) -> Vec<u8> {
    encode_pong_from(seq, true)
}

/// [`encode_ping`] from a side that says whether it `sends_pings`: status
/// [`DOES_NOT_PING`](super::DOES_NOT_PING) when it does not.
pub fn encode_ping_from(seq: u64, sends_pings: bool) -> Vec<u8> {
    Header::new(Kind::Ping, heartbeat_status(sends_pings), seq, 0)
        .encode()
        .to_vec()
}

/// [`encode_pong`] from a side that says whether it `sends_pings`: status
/// [`DOES_NOT_PING`](super::DOES_NOT_PING) when it does not.
pub fn encode_pong_from(seq: u64, sends_pings: bool) -> Vec<u8> {
    Header::new(Kind::Pong, heartbeat_status(sends_pings), seq, 0)
        .encode()
        .to_vec()
}

/// The status byte of a Ping or Pong (see [`DOES_NOT_PING`](super::DOES_NOT_PING)).
fn heartbeat_status(sends_pings: bool) -> u8 {
    if sends_pings { 0 } else { super::DOES_NOT_PING }
}

/// Encodes a whole Close frame (id 0) whose body is the str `reason`.
///
/// `reason` is cut to 64 KiB (at a char boundary).
pub fn encode_close(status: CloseStatus, reason: &str) -> Vec<u8> {
    text_frame(Kind::Close, status as u8, 0, reason, MAX_TEXT_LEN)
}

/// Reads a str body (error Response, Close) into a `String`. Never fails.
///
/// Invalid UTF-8 is replaced lossily. A body that is not exactly one str is
/// described instead, e.g. `"<non-string body of 7 bytes>"` or
/// `"<empty body>"`, so the result can always go into a log line.
pub fn decode_text_body(body: &[u8]) -> String {
    if body.is_empty() {
        return "<empty body>".to_owned();
    }
    let mut cur = Cursor::new(body);
    match read_str(&mut cur) {
        Some(raw) if cur.rest().is_empty() => String::from_utf8_lossy(raw).into_owned(),
        _ => format!("<non-string body of {} bytes>", body.len()),
    }
}

fn syntax(message: String) -> rmp_serde::encode::Error {
    <rmp_serde::encode::Error as serde::ser::Error>::custom(message)
}

/// Bytes reserved for an encoded argument list or result before it is
/// written. Room for a small value means no `realloc` per call (the encoder
/// would otherwise grow the vector while writing it: 1.5 % of the CPU of
/// 64 pipelined 32-byte calls); a larger value grows the vector as before.
const VALUE_ROOM: usize = 96;

/// An output vector holding a header placeholder, with room for `body_hint` bytes.
fn start_frame(body_hint: usize) -> Vec<u8> {
    let mut out = frame_pool::take(HEADER_LEN + body_hint);
    out.extend_from_slice(&[0; HEADER_LEN]);
    out
}

/// Writes the real header over the placeholder of `out`.
fn finish_frame(
    mut out: Vec<u8>,
    kind: Kind,
    status: u8,
    id: u64,
) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    let body_len = out.len().saturating_sub(HEADER_LEN);
    let body_len = u32::try_from(body_len)
        .map_err(|_| syntax(format!("body of {body_len} bytes exceeds u32::MAX")))?;
    if let Some(placeholder) = out.get_mut(..HEADER_LEN) {
        placeholder.copy_from_slice(&Header::new(kind, status, id, body_len).encode());
    }
    Ok(out)
}

/// A whole frame whose body is the str `text`, cut to `max_text` bytes (at
/// most [`MAX_TEXT_LEN`]).
fn text_frame(kind: Kind, status: u8, id: u64, text: &str, max_text: usize) -> Vec<u8> {
    let mut cut = text.len().min(max_text);
    while !text.is_char_boundary(cut) {
        cut -= 1; // stops at 0 at the latest: 0 is always a char boundary
    }
    let text = text.get(..cut).unwrap_or_default();
    let mut out = start_frame(text.len() + 5);
    write_str(&mut out, text);
    let body_len = (out.len() - HEADER_LEN) as u32; // at most max_text + 5
    if let Some(placeholder) = out.get_mut(..HEADER_LEN) {
        placeholder.copy_from_slice(&Header::new(kind, status, id, body_len).encode());
    }
    out
}

/// Appends `s` as a MessagePack str in its shortest form; `false` (and
/// nothing written) when it is longer than `u32::MAX` bytes.
fn write_str(out: &mut Vec<u8>, s: &str) -> bool {
    let len = s.len();
    if len < 32 {
        out.push(0xa0 | len as u8);
    } else if let Ok(len) = u8::try_from(len) {
        out.extend_from_slice(&[0xd9, len]);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(0xda);
        out.extend_from_slice(&len.to_be_bytes());
    } else if let Ok(len) = u32::try_from(len) {
        out.push(0xdb);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        return false;
    }
    out.extend_from_slice(s.as_bytes());
    true
}

/// Reads one MessagePack str (any of its four forms); `None` when the next
/// value is not a str or is cut short.
fn read_str<'a>(cur: &mut Cursor<'a>) -> Option<&'a [u8]> {
    let len = match cur.u8()? {
        marker @ 0xa0..=0xbf => usize::from(marker & 0x1f),
        0xd9 => usize::from(cur.u8()?),
        0xda => usize::from(cur.be_u16()?),
        0xdb => cur.be_u32()? as usize,
        _ => return None,
    };
    cur.take(len)
}

/// A read position over a byte slice; every read is bounds-checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, pos: 0 }
    }

    fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let taken = self.rest().get(..n)?;
        self.pos += n;
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|b| b.first().copied())
    }

    fn be_u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes(b.try_into().ok()?))
    }

    fn be_u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes(b.try_into().ok()?))
    }
}

/// Returns the length of the one well-formed MessagePack value at the start
/// of `bytes`.
///
/// Iterative (no recursion, so no stack overflow whatever the input), with an
/// explicit stack of "elements still to read" per open array/map, at most
/// `max_depth` deep. Declared lengths are checked against the bytes left
/// before anything is skipped; nothing is allocated beyond the depth stack.
fn skip_value(bytes: &[u8], max_depth: usize) -> Result<usize, String> {
    let mut cur = Cursor::new(bytes);
    let mut open: Vec<u64> = Vec::new();
    loop {
        let at = cur.pos;
        let truncated = || format!("value at offset {at} is cut short by the end of the body");
        let marker = cur.u8().ok_or_else(truncated)?;
        // Payload bytes to skip, and the number of child values for containers.
        let (skip, children): (usize, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (usize::from(marker & 0x1f), 0),
            0xc1 => return Err(format!("reserved marker 0xc1 at offset {at}")),
            0xc4 | 0xd9 => (usize::from(cur.u8().ok_or_else(truncated)?), 0),
            0xc5 | 0xda => (usize::from(cur.be_u16().ok_or_else(truncated)?), 0),
            0xc6 | 0xdb => (cur.be_u32().ok_or_else(truncated)? as usize, 0),
            0xc7 => (usize::from(cur.u8().ok_or_else(truncated)?) + 1, 0),
            0xc8 => (usize::from(cur.be_u16().ok_or_else(truncated)?) + 1, 0),
            0xc9 => (
                (cur.be_u32().ok_or_else(truncated)? as usize).saturating_add(1),
                0,
            ),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, u64::from(cur.be_u16().ok_or_else(truncated)?)),
            0xdd => (0, u64::from(cur.be_u32().ok_or_else(truncated)?)),
            0xde => (0, 2 * u64::from(cur.be_u16().ok_or_else(truncated)?)),
            0xdf => (0, 2 * u64::from(cur.be_u32().ok_or_else(truncated)?)),
        };
        if skip > 0 && cur.take(skip).is_none() {
            return Err(format!(
                "value at offset {at} declares {skip} bytes of payload but only {} remain",
                cur.rest().len()
            ));
        }
        // An empty array or map is a level too (`[[]]` is 2 deep, as `[[1]]`).
        let container = matches!(marker, 0x80..=0x9f | 0xdc..=0xdf);
        if container && open.len() >= max_depth {
            return Err(format!("arrays/maps nested deeper than {max_depth} levels"));
        }
        if children > 0 {
            // Every element takes at least one byte.
            let left = cur.rest().len() as u64;
            if children > left {
                return Err(format!(
                    "container at offset {at} declares {children} elements but only {left} bytes remain"
                ));
            }
            open.push(children);
            continue;
        }
        // A value is complete: count it in its container, closing every
        // container it completes in turn.
        loop {
            match open.last_mut() {
                None => return Ok(cur.pos),
                Some(left) => {
                    // No underflow: only counts > 0 are pushed, and a count
                    // that reaches 0 is popped at once.
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    open.pop();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DEFAULT_MAX_FRAME_LEN, FrameDecoder};
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Point {
        x: i32,
        label: String,
        tags: Vec<u8>,
        #[serde(with = "serde_bytes_shim")]
        blob: Vec<u8>,
    }

    /// `serde_bytes` is not a dependency; this does the same for one field.
    mod serde_bytes_shim {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(bytes)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            rmpv::Value::deserialize(d)?
                .as_slice()
                .map(<[u8]>::to_vec)
                .ok_or_else(|| serde::de::Error::custom("expected bin"))
        }
    }

    fn decode_frame(bytes: &[u8]) -> crate::protocol::Frame {
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        decoder.feed(bytes);
        let frame = decoder.next_frame().unwrap().unwrap();
        assert_eq!(decoder.buffered_len(), 0, "exactly one frame");
        frame
    }

    fn request_round_trip<A: Serialize + ?Sized>(args: &A) -> Vec<u8> {
        let bytes = encode_request(Kind::OneWay, 99, "svc", "1.0", "blue", "do_it", args).unwrap();
        let frame = decode_frame(&bytes);
        assert_eq!(
            frame.header,
            Header::new(Kind::OneWay, 0, 99, frame.body.len() as u32)
        );
        let body = decode_request_body(&frame.body).unwrap();
        assert_eq!(
            (body.service, body.version, body.group, body.method),
            ("svc", "1.0", "blue", "do_it")
        );
        assert_eq!(body.args, rmp_serde::to_vec(args).unwrap());
        body.args.to_vec()
    }

    #[test]
    fn request_round_trip_struct() {
        let point = Point {
            x: -3,
            label: "p".into(),
            tags: vec![1, 2],
            blob: vec![0xff; 3],
        };
        let args = request_round_trip(&point);
        // Structs are arrays of their fields; Vec<u8> an array; serialize_bytes a bin.
        assert_eq!(
            args,
            [
                0x94, 0xfd, 0xa1, b'p', 0x92, 1, 2, 0xc4, 3, 0xff, 0xff, 0xff
            ]
        );
        assert_eq!(rmp_serde::from_slice::<Point>(&args).unwrap(), point);
    }

    #[test]
    fn request_round_trip_int_string_bytes() {
        assert_eq!(request_round_trip(&7u64), [7]);
        assert_eq!(request_round_trip(&-1i64), [0xff]);
        assert_eq!(
            request_round_trip(&u64::MAX),
            [0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(request_round_trip("hi"), [0xa2, b'h', b'i']);
        let long = "x".repeat(70_000);
        let args = request_round_trip(long.as_str());
        assert_eq!(rmp_serde::from_slice::<String>(&args).unwrap(), long);
        let bytes = rmpv::Value::Binary(vec![1, 2, 3]);
        assert_eq!(request_round_trip(&bytes), [0xc4, 3, 1, 2, 3]);
        assert_eq!(request_round_trip(&()), [0xc0]);
    }

    #[test]
    fn request_round_trip_rmpv_value() {
        use rmpv::Value;
        let value = Value::Map(vec![
            (
                Value::from("a"),
                Value::Array(vec![Value::Nil, Value::from(true), Value::F64(1.5)]),
            ),
            (Value::from(-300), Value::Ext(5, vec![1, 2, 3, 4])),
            (Value::Binary(vec![]), Value::F32(0.25)),
        ]);
        let args = request_round_trip(&value);
        let back = rmpv::decode::read_value(&mut &args[..]).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn request_header_fields() {
        let bytes =
            encode_request(Kind::Request, 0xdead_beef, "demo", "", "", "ping", &7u64).unwrap();
        let header = Header::decode(bytes[..HEADER_LEN].try_into().unwrap(), u32::MAX).unwrap();
        assert_eq!(header, Header::new(Kind::Request, 0, 0xdead_beef, 14));
        assert_eq!(&bytes[HEADER_LEN..], b"\x95\xa4demo\xa0\xa0\xa4ping\x07");
    }

    #[test]
    fn small_values_are_encoded_without_growing_the_frame() {
        // The room reserved before encoding (what `start_frame` asks of
        // `frame_pool::take`) holds the whole frame: the encoder never had
        // to grow it. (The buffer itself may be a kept one, larger.)
        let value = serde_bytes_like(64);
        let response = encode_ok_response(1, &value).unwrap();
        assert!(response.len() <= HEADER_LEN + VALUE_ROOM);
        let request = encode_request(Kind::Request, 1, "svc", "1", "", "echo", &value).unwrap();
        let strings = ["svc", "1", "", "echo"]
            .iter()
            .map(|s| s.len() + 5)
            .sum::<usize>();
        assert!(request.len() <= HEADER_LEN + strings + 1 + VALUE_ROOM);
    }

    /// A msgpack bin of `n` bytes (what `serde_bytes` would encode).
    fn serde_bytes_like(n: usize) -> rmpv::Value {
        rmpv::Value::Binary(vec![7; n])
    }

    #[test]
    fn encode_request_rejects_other_kinds() {
        for kind in [Kind::Response, Kind::Ping, Kind::Pong, Kind::Close] {
            assert!(encode_request(kind, 1, "s", "", "", "m", &1).is_err());
        }
    }

    #[test]
    fn long_field_strings_use_wider_str_forms() {
        let service = "s".repeat(40);
        let method = "m".repeat(300);
        let group = "g".repeat(70_000);
        let bytes =
            encode_request(Kind::Request, 1, &service, "v", &group, &method, &[1, 2]).unwrap();
        let body = decode_request_body(&bytes[HEADER_LEN..]).unwrap();
        assert_eq!(
            (body.service, body.group, body.method),
            (&*service, &*group, &*method)
        );
        assert_eq!(bytes[HEADER_LEN + 1], 0xd9);
    }

    #[test]
    fn not_array() {
        for body in [&b""[..], b"\xc0", b"\x85", b"\xa5hello", b"\xdc\x00"] {
            assert_eq!(
                decode_request_body(body),
                Err(BodyError::NotArray),
                "{body:?}"
            );
        }
        assert_eq!(
            BodyError::NotArray.to_string(),
            "request body must be a MessagePack array of 5 elements [service, version, group, method, args]"
        );
    }

    #[test]
    fn wrong_arity() {
        let err = decode_request_body(b"\x93\xa1a\xa1b\xa1c").unwrap_err();
        assert_eq!(err, BodyError::WrongArity(3));
        assert_eq!(
            err.to_string(),
            "request body must be an array of 5 elements, got 3"
        );
        assert_eq!(
            decode_request_body(b"\xdc\x00\x06"),
            Err(BodyError::WrongArity(6))
        );
        assert_eq!(
            decode_request_body(b"\xdd\xff\xff\xff\xff"),
            Err(BodyError::WrongArity(u32::MAX))
        );
        // Array16 and array32 forms of 5 are accepted.
        assert!(decode_request_body(b"\xdc\x00\x05\xa0\xa0\xa0\xa0\xc0").is_ok());
        assert!(decode_request_body(b"\xdd\x00\x00\x00\x05\xa0\xa0\xa0\xa0\xc0").is_ok());
    }

    #[test]
    fn not_string() {
        let cases: [(&[u8], &str); 6] = [
            (b"\x95\x01\xa0\xa0\xa0\xc0", "service"),
            (b"\x95\xa0\xc4\x00\xa0\xa0\xc0", "version"),
            (b"\x95\xa0\xa0\xa2\xff\xfe\xa0\xc0", "group"), // invalid UTF-8
            (b"\x95\xa0\xa0\xa0\xa5ab", "method"),          // cut short
            (b"\x95\xa0\xa0\xa0\xdb\xff\xff\xff\xff", "method"),
            (b"\x95\xa0\xa0\xa0", "method"),
        ];
        for (body, field) in cases {
            assert_eq!(
                decode_request_body(body),
                Err(BodyError::NotString { field }),
                "{body:?}"
            );
        }
        assert_eq!(
            BodyError::NotString { field: "group" }.to_string(),
            "request field `group` must be a MessagePack str of valid UTF-8"
        );
    }

    #[test]
    fn bad_args() {
        let prefix = b"\x95\xa0\xa0\xa0\xa0";
        let cases: [&[u8]; 7] = [
            b"",                     // missing
            b"\xc1",                 // reserved marker
            b"\x92\x01",             // array cut short
            b"\xcd\x01",             // u16 cut short
            b"\xc6\xff\xff\xff\xff", // bin32 claiming 4 GiB
            b"\xdd\xff\xff\xff\xff", // array32 claiming 4 G elements
            b"\xdf\x00\x00\x00\x01\x01",
        ];
        for args in cases {
            let body = [&prefix[..], args].concat();
            assert!(
                matches!(decode_request_body(&body), Err(BodyError::BadArgs(_))),
                "{args:?}: {:?}",
                decode_request_body(&body)
            );
        }
        let err = decode_request_body(&[&prefix[..], b"\xc1"].concat()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "request args are not a well-formed MessagePack value: reserved marker 0xc1 at offset 0"
        );
    }

    #[test]
    fn trailing_bytes() {
        let err = decode_request_body(b"\x95\xa0\xa0\xa0\xa0\x07\x08\x09").unwrap_err();
        assert_eq!(err, BodyError::TrailingBytes(2));
        assert_eq!(
            err.to_string(),
            "request body has 2 trailing bytes after the args value"
        );
    }

    #[test]
    fn every_marker_kind_is_skipped_correctly() {
        use rmpv::Value;
        let values = [
            Value::Nil,
            Value::from(false),
            Value::from(127),
            Value::from(-32),
            Value::from(200u8),
            Value::from(60_000u16),
            Value::from(4_000_000_000u32),
            Value::from(u64::MAX),
            Value::from(-100i8),
            Value::from(-30_000i16),
            Value::from(-2_000_000_000i32),
            Value::from(i64::MIN),
            Value::F32(1.0),
            Value::F64(2.0),
            Value::from("x".repeat(31)),
            Value::from("x".repeat(255)),
            Value::from("x".repeat(256)),
            Value::from("x".repeat(70_000)),
            Value::Binary(vec![1; 255]),
            Value::Binary(vec![1; 256]),
            Value::Binary(vec![1; 70_000]),
            Value::Array(vec![Value::Nil; 15]),
            Value::Array(vec![Value::Nil; 16]),
            Value::Array(vec![Value::Nil; 70_000]),
            Value::Map(vec![(Value::Nil, Value::Nil); 15]),
            Value::Map(vec![(Value::Nil, Value::Nil); 16]),
            Value::Map(vec![(Value::Nil, Value::Nil); 70_000]),
            Value::Array(vec![]),
            Value::Map(vec![]),
        ]
        .into_iter()
        .chain([1usize, 2, 4, 8, 16, 3, 255, 256, 70_000].map(|n| Value::Ext(-1, vec![9; n])));
        for value in values {
            let mut encoded = Vec::new();
            rmpv::encode::write_value(&mut encoded, &value).unwrap();
            assert_eq!(
                skip_value(&encoded, MAX_ARGS_DEPTH),
                Ok(encoded.len()),
                "{value:?}"
            );
            encoded.push(0);
            assert_eq!(skip_value(&encoded, MAX_ARGS_DEPTH), Ok(encoded.len() - 1));
            encoded.truncate(encoded.len() - 2);
            assert!(
                skip_value(&encoded, MAX_ARGS_DEPTH).is_err(),
                "truncated {value:?}"
            );
        }
    }

    #[test]
    fn deeply_nested_args_rejected_without_stack_overflow() {
        let prefix = b"\x95\xa0\xa0\xa0\xa0";
        // `depth` arrays of 1 (`0x91`) or maps of 1 (`0x81` + a nil key) around a nil.
        let nested = |depth: usize, open: &[u8]| {
            let mut body = prefix.to_vec();
            for _ in 0..depth {
                body.extend_from_slice(open);
            }
            body.push(0xc0);
            body
        };
        for open in [&[0x91][..], &[0x81, 0xc0]] {
            assert!(decode_request_body(&nested(MAX_ARGS_DEPTH, open)).is_ok());
            let err = decode_request_body(&nested(MAX_ARGS_DEPTH + 1, open)).unwrap_err();
            assert_eq!(
                err,
                BodyError::BadArgs("arrays/maps nested deeper than 512 levels".into())
            );
            assert!(matches!(
                decode_request_body(&nested(1_000_000, open)),
                Err(BodyError::BadArgs(_))
            ));
        }
        // An empty array or map innermost is a level of its own: 511
        // around an empty one is 512 deep, 512 around one is 513.
        for empty in [0x90, 0x80] {
            let mut body = nested(MAX_ARGS_DEPTH - 1, &[0x91]);
            *body.last_mut().unwrap() = empty; // in place of the nil
            assert!(decode_request_body(&body).is_ok());
            let mut body = nested(MAX_ARGS_DEPTH, &[0x91]);
            *body.last_mut().unwrap() = empty;
            assert_eq!(
                decode_request_body(&body).unwrap_err(),
                BodyError::BadArgs("arrays/maps nested deeper than 512 levels".into())
            );
        }
    }

    #[test]
    fn ok_response() {
        let bytes = encode_ok_response(1, &7u64).unwrap();
        assert_eq!(
            bytes,
            b"PL\x01\x02\x01\x00\x00\x00\0\0\0\0\0\0\0\x01\0\0\0\x01\x07"
        );
        let frame = decode_frame(&encode_ok_response(5, &("a", 1)).unwrap());
        assert_eq!(frame.header.status, 0);
        assert_eq!(
            rmp_serde::from_slice::<(String, i32)>(&frame.body).unwrap(),
            ("a".into(), 1)
        );
    }

    #[test]
    fn error_response() {
        let frame = decode_frame(&encode_error_response(
            8,
            ResponseStatus::MethodNotFound,
            "no method `x`",
        ));
        assert_eq!(frame.header, Header::new(Kind::Response, 2, 8, 14));
        assert_eq!(decode_text_body(&frame.body), "no method `x`");
    }

    #[test]
    fn ping_and_pong() {
        assert_eq!(
            decode_frame(&encode_ping(42)).header,
            Header::new(Kind::Ping, 0, 42, 0)
        );
        assert_eq!(
            decode_frame(&encode_pong(42)).header,
            Header::new(Kind::Pong, 0, 42, 0)
        );
        assert!(decode_frame(&encode_pong(u64::MAX)).body.is_empty());
    }

    #[test]
    fn close() {
        let frame = decode_frame(&encode_close(
            CloseStatus::HeartbeatTimeout,
            "no pong for 3 s",
        ));
        assert_eq!(frame.header, Header::new(Kind::Close, 1, 0, 16));
        assert_eq!(decode_text_body(&frame.body), "no pong for 3 s");
    }

    #[test]
    fn long_texts_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(MAX_TEXT_LEN); // 2 bytes each
        let frame = decode_frame(&encode_close(CloseStatus::Normal, &reason));
        let text = decode_text_body(&frame.body);
        assert_eq!(text.len(), MAX_TEXT_LEN);
        assert!(reason.starts_with(&text));
        let odd = format!("a{reason}");
        let text = decode_text_body(
            &decode_frame(&encode_error_response(
                1,
                ResponseStatus::HandlerError,
                &odd,
            ))
            .body,
        );
        assert_eq!(text.len(), MAX_TEXT_LEN - 1);
        for len in [31, 32, 255, 256, 65_535] {
            let text = "z".repeat(len);
            let frame = decode_frame(&encode_close(CloseStatus::Normal, &text));
            assert_eq!(decode_text_body(&frame.body), text);
            assert_eq!(
                frame.body,
                rmp_serde::to_vec(&text).unwrap(),
                "shortest str form"
            );
        }
    }

    #[test]
    fn text_body_never_fails() {
        assert_eq!(decode_text_body(b"\xa3abc"), "abc");
        assert_eq!(decode_text_body(b"\xd9\x02\xff\x61"), "\u{fffd}a");
        assert_eq!(decode_text_body(b""), "<empty body>");
        assert_eq!(decode_text_body(b"\x07"), "<non-string body of 1 bytes>");
        assert_eq!(decode_text_body(b"\xa5abc"), "<non-string body of 4 bytes>");
        assert_eq!(decode_text_body(b"\xa1ab"), "<non-string body of 3 bytes>");
        assert_eq!(
            decode_text_body(b"\xdb\xff\xff\xff\xff"),
            "<non-string body of 5 bytes>"
        );
    }
}
