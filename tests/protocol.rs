//! Property tests of the wire protocol: framing under arbitrary chunkings,
//! robustness against arbitrary bytes, header and body round trips.

use std::io;

use proptest::prelude::*;
use pulse::protocol::{
    DEFAULT_MAX_FRAME_LEN, Frame, FrameDecoder, FrameError, HEADER_LEN, Header, Kind,
    decode_request_body, decode_text_body, encode_request,
};

fn kind() -> impl Strategy<Value = Kind> {
    (1u8..=6).prop_map(|byte| Kind::from_u8(byte).expect("1..=6 are kinds"))
}

/// Mostly small bodies, sometimes one above the decoder's large-body threshold.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => Just(Vec::new()),
        1 => (30_000usize..140_000, any::<u8>()).prop_map(|(len, seed)| {
            (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
        }),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    (kind(), any::<u8>(), any::<u64>(), body()).prop_map(|(kind, status, id, body)| Frame {
        header: Header::new(kind, status, id, body.len() as u32),
        body,
    })
}

fn stream(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        out.extend_from_slice(&frame.header.encode());
        out.extend_from_slice(&frame.body);
    }
    out
}

/// Cuts `bytes` at the given sizes (cycled), every piece at least one byte.
fn pieces<'a>(bytes: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at((*size).clamp(1, rest.len()));
        out.push(now);
        rest = later;
    }
    out
}

/// Hands out one planned piece per `read` (clipped to the caller's buffer).
struct PlannedReader<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    next: usize,
}

impl io::Read for PlannedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = self
            .sizes
            .get(self.next % self.sizes.len().max(1))
            .copied()
            .unwrap_or(1);
        self.next += 1;
        let n = want.max(1).min(buf.len()).min(self.data.len());
        let (now, rest) = self.data.split_at(n);
        buf[..n].copy_from_slice(now);
        self.data = rest;
        Ok(n)
    }
}

fn drain(decoder: &mut FrameDecoder, out: &mut Vec<Frame>) -> Result<(), TestCaseError> {
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => out.push(frame),
            Ok(None) => return Ok(()),
            Err(err) => return Err(TestCaseError::fail(format!("valid stream rejected: {err}"))),
        }
    }
}

fn sizes() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(prop_oneof![1usize..25, 1usize..300, 1usize..100_000], 1..20)
}

proptest! {
    /// Feeding any split of a valid stream yields exactly the encoded frames.
    #[test]
    fn any_feed_split_decodes_the_same_frames(
        frames in proptest::collection::vec(frame(), 0..12),
        sizes in sizes(),
    ) {
        let bytes = stream(&frames);
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut decoded = Vec::new();
        let mut fed = 0;
        for piece in pieces(&bytes, &sizes) {
            decoder.feed(piece);
            fed += piece.len();
            drain(&mut decoder, &mut decoded)?;
            let returned: usize = decoded.iter().map(|f| HEADER_LEN + f.body.len()).sum();
            prop_assert_eq!(decoder.buffered_len(), fed - returned);
            prop_assert_eq!(decoder.is_mid_frame(), fed != returned);
        }
        prop_assert_eq!(&decoded, &frames);
        prop_assert!(!decoder.is_mid_frame());
        prop_assert_eq!(decoder.buffered_len(), 0);
    }

    /// Reading any split of a valid stream through `read_from` yields exactly
    /// the encoded frames, one `read` per call.
    #[test]
    fn any_read_split_decodes_the_same_frames(
        frames in proptest::collection::vec(frame(), 0..12),
        sizes in sizes(),
    ) {
        let bytes = stream(&frames);
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut reader = PlannedReader { data: &bytes, sizes, next: 0 };
        let mut decoded = Vec::new();
        let mut total = 0;
        loop {
            let reads_before = reader.next;
            let n = decoder.read_from(&mut reader).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(reader.next, reads_before + 1, "exactly one read per call");
            total += n;
            drain(&mut decoder, &mut decoded)?;
            if n == 0 {
                break;
            }
        }
        prop_assert_eq!(total, bytes.len());
        prop_assert_eq!(&decoded, &frames);
        prop_assert!(!decoder.is_mid_frame());
    }

    /// Arbitrary bytes never panic the decoder; an error is sticky.
    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(
        valid_prefix in proptest::collection::vec(frame(), 0..3),
        garbage in proptest::collection::vec(any::<u8>(), 0..400),
        keep_magic in any::<bool>(),
        sizes in proptest::collection::vec(1usize..50, 1..8),
        max in prop_oneof![Just(DEFAULT_MAX_FRAME_LEN), 0u32..100, Just(u32::MAX)],
    ) {
        let mut bytes = stream(&valid_prefix);
        let mut garbage = garbage;
        if keep_magic && garbage.len() >= 5 {
            // Get past the first checks more often.
            let kind = garbage[3] % 8;
            garbage[..5].copy_from_slice(&[b'P', b'L', 1, kind, 1]);
        }
        bytes.extend_from_slice(&garbage);
        let mut decoder = FrameDecoder::new(max);
        let mut first_error: Option<FrameError> = None;
        for piece in pieces(&bytes, &sizes) {
            decoder.feed(piece);
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        prop_assert!(first_error.is_none());
                        prop_assert_eq!(frame.body.len(), frame.header.body_len as usize);
                        prop_assert!(frame.header.body_len <= max);
                        let _ = decode_request_body(&frame.body);
                        let _ = decode_text_body(&frame.body);
                    }
                    Ok(None) => break,
                    Err(err) => {
                        if let Some(first) = &first_error {
                            prop_assert_eq!(first, &err);
                        }
                        first_error = Some(err);
                        break;
                    }
                }
            }
            prop_assert!(decoder.capacity() <= 4 * 64 * 1024 + 2 * bytes.len());
        }
        if let Some(err) = first_error {
            prop_assert_eq!(decoder.next_frame(), Err(err));
        }
    }

    /// Arbitrary bytes never panic the body decoders.
    #[test]
    fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_request_body(&body);
        let text = decode_text_body(&body);
        if body.is_empty() {
            prop_assert_eq!(text, "<empty body>");
        }
        // Also behind a valid request prefix, so the args skipper sees garbage.
        let mut request = b"\x95\xa4demo\xa0\xa0\xa4ping".to_vec();
        request.extend_from_slice(&body);
        if let Ok(decoded) = decode_request_body(&request) {
            prop_assert_eq!(decoded.args, &body[..]);
            // What the skipper accepts, a real MessagePack parser accepts too.
            let mut args = decoded.args;
            prop_assert!(rmpv::decode::read_value_ref(&mut args).is_ok());
            prop_assert!(args.is_empty());
        }
    }

    /// Any header with a valid kind round-trips; `body_len` over the limit is TooLong.
    #[test]
    fn arbitrary_headers_round_trip(
        kind in kind(),
        status in any::<u8>(),
        id in any::<u64>(),
        body_len in any::<u32>(),
        max in any::<u32>(),
        reserved in any::<[u8; 2]>(),
    ) {
        let header = Header::new(kind, status, id, body_len);
        let mut bytes = header.encode();
        prop_assert_eq!(&bytes[..3], b"PL\x01");
        prop_assert_eq!(&bytes[6..8], &[0, 0]);
        bytes[6..8].copy_from_slice(&reserved);
        prop_assert_eq!(Header::decode(&bytes, u32::MAX), Ok(header));
        let expected = if body_len <= max {
            Ok(header)
        } else {
            Err(FrameError::TooLong { len: body_len, max })
        };
        prop_assert_eq!(Header::decode(&bytes, max), expected);
    }

    /// Any MessagePack value as args round-trips through a request.
    #[test]
    fn arbitrary_args_round_trip(
        value in msgpack_value(),
        service in "[a-z.]{0,40}",
        method in "\\PC{0,10}",
        id in any::<u64>(),
        one_way in any::<bool>(),
    ) {
        let kind = if one_way { Kind::OneWay } else { Kind::Request };
        let bytes = encode_request(kind, id, &service, "1", "", &method, &value)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        decoder.feed(&bytes);
        let frame = decoder.next_frame().ok().flatten().ok_or_else(|| TestCaseError::fail("no frame"))?;
        prop_assert_eq!((frame.header.kind, frame.header.id), (kind, id));
        let body = decode_request_body(&frame.body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!((body.service, body.version, body.group), (&*service, "1", ""));
        prop_assert_eq!(body.method, &*method);
        let mut args = body.args;
        let back = rmpv::decode::read_value(&mut args).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, value);
    }
}

fn msgpack_value() -> impl Strategy<Value = rmpv::Value> {
    use rmpv::Value;
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("NaN is not equal to itself", |f| !f.is_nan())
            .prop_map(Value::F64),
        any::<f32>()
            .prop_filter("NaN is not equal to itself", |f| !f.is_nan())
            .prop_map(Value::F32),
        "\\PC{0,40}".prop_map(Value::from),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Binary),
        (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(t, d)| Value::Ext(t, d)),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((inner.clone(), inner), 0..6).prop_map(Value::Map),
        ]
    })
}
