//! The properties of pulse's network-facing decoders, written once for both
//! places that check them: the proptest cases of
//! `tests/decoders_arbitrary.rs` (through `mod support`) and the libFuzzer
//! targets in `fuzz/fuzz_targets/` (which include this file by path, as
//! `#[path = "../../tests/support/decoder_oracle.rs"] mod decoder_oracle;`).
//!
//! So this file uses only pulse's public API, `rmpv` and `rmp_serde`, which
//! both crates depend on, and nothing else of `tests/support`.

#![allow(dead_code)] // each fuzz target uses one property

use std::io;

use pulse::protocol::{
    DEFAULT_MAX_FRAME_LEN, Frame, FrameDecoder, FrameError, HEADER_LEN, Header, Kind,
    ResponseStatus, decode_request_body, decode_text_body, encode_error_response, encode_request,
};

// ----- FrameDecoder ------------------------------------------------------------------

/// One chunk of a stream: its length and whether it arrives by `read_from`
/// (the event loop's path, which reads straight into a large body's buffer)
/// or by `feed`.
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    pub len: usize,
    pub by_read: bool,
}

/// Splits a `frame_decoder` fuzz input into `max_frame_len`, the chunking and
/// the stream; `None` when it is too short to hold the first two bytes.
///
/// Layout (so the fuzzer mutates the chunking and the data apart): byte 0
/// picks `max_frame_len` (low two bits: 64, 1 KiB, 64 KiB, 16 MiB); byte 1 is
/// how many chunk descriptors follow (0..=15); each descriptor byte is bit 7 =
/// `read_from` (else `feed`), bit 6 = ×512, low 6 bits + 1 = the chunk
/// length; descriptors are used in a cycle (none: 64-byte chunks by `feed`).
/// The rest is the stream.
pub fn parse_frame_decoder_input(input: &[u8]) -> Option<(u32, Vec<Cut>, &[u8])> {
    let (&config, rest) = input.split_first()?;
    let max = [64, 1024, 64 * 1024, DEFAULT_MAX_FRAME_LEN][usize::from(config & 3)];
    let (&n, rest) = rest.split_first()?;
    let n = usize::from(n & 15).min(rest.len());
    let (descriptors, data) = rest.split_at(n);
    let descriptors = if descriptors.is_empty() {
        &[0x3f][..]
    } else {
        descriptors
    };
    let cuts = descriptors
        .iter()
        .map(|&d| Cut {
            len: (usize::from(d & 0x3f) + 1) << if d & 0x40 != 0 { 9 } else { 0 },
            by_read: d & 0x80 != 0,
        })
        .collect();
    Some((max, cuts, data))
}

/// A reader that hands out at most `limit` bytes per `read`.
struct Limited<'a> {
    data: &'a [u8],
    limit: usize,
}

impl io::Read for Limited<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.limit.min(buf.len()).min(self.data.len());
        let (now, rest) = self.data.split_at(n);
        buf[..n].copy_from_slice(now);
        self.data = rest;
        Ok(n)
    }
}

/// The frames of the whole stream, its first error, and the bytes consumed:
/// a reference parse with `Header::decode`.
fn reference(data: &[u8], max: u32) -> (Vec<Frame>, Option<FrameError>, usize) {
    let mut frames = Vec::new();
    let mut pos = 0;
    while data.len() - pos >= HEADER_LEN {
        let bytes: &[u8; HEADER_LEN] = data[pos..pos + HEADER_LEN].try_into().unwrap();
        let header = match Header::decode(bytes, max) {
            Ok(header) => header,
            Err(e) => return (frames, Some(e), pos),
        };
        let end = pos + HEADER_LEN + header.body_len as usize;
        if end > data.len() {
            break;
        }
        frames.push(Frame {
            header,
            body: data[pos + HEADER_LEN..end].to_vec(),
        });
        pos = end;
    }
    (frames, None, pos)
}

/// Decodes `data` in `cuts` (cycled), draining after every chunk as the event
/// loop does, and lending the read buffer as it does too (`adopt_buffer`
/// before each chunk, `release_buffer` after it, one spare buffer kept
/// between them); checks the result against the whole-stream reference:
/// exactly the reference frames, then the reference error (if any, repeated
/// by the poisoned decoder), and agreement on `is_mid_frame` and
/// `buffered_len`. Returns the number of frames.
pub fn check_chunked(data: &[u8], cuts: &[Cut], max: u32) -> usize {
    let (expected, expected_err, consumed) = reference(data, max);
    let mut decoder = FrameDecoder::new(max);
    let mut got = Vec::new();
    let mut got_err = None;
    let mut left = data;
    let mut i = 0;
    let mut spare: Option<Vec<u8>> = None;
    while !left.is_empty() {
        let cut = cuts[i % cuts.len()];
        i += 1;
        if let Some(buf) = spare.take() {
            spare = decoder.adopt_buffer(buf);
        }
        let len = cut.len.clamp(1, left.len());
        if cut.by_read {
            let mut reader = Limited {
                data: &left[..len],
                limit: len,
            };
            let read = decoder.read_from(&mut reader).expect("an in-memory read");
            // Zero means end of stream to the event loop: never with bytes
            // available (a poisoned decoder reads into its scratch buffer).
            assert!(
                read > 0,
                "read_from returned 0 (end of stream) with {len} bytes available"
            );
            assert!(read <= len, "read_from read {read} of {len} bytes");
            left = &left[read..];
        } else {
            decoder.feed(&left[..len]);
            left = &left[len..];
        }
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert_eq!(frame.body.len(), frame.header.body_len as usize);
                    assert!(frame.header.body_len <= max);
                    got.push(frame);
                }
                Ok(None) => break,
                Err(e) => {
                    assert_eq!(
                        decoder.next_frame(),
                        Err(e.clone()),
                        "a poisoned decoder repeats its error"
                    );
                    got_err = Some(e);
                    break;
                }
            }
        }
        if let Some(buf) = decoder.release_buffer()
            && spare.is_none()
        {
            spare = Some(buf);
        }
    }
    assert_eq!(got.len(), expected.len(), "frame count");
    assert!(got == expected, "frames differ from the reference");
    assert_eq!(got_err, expected_err);
    if expected_err.is_none() {
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.buffered_len(), data.len() - consumed);
        assert_eq!(decoder.is_mid_frame(), consumed < data.len());
    } else {
        assert!(!decoder.is_mid_frame());
    }
    got.len()
}

// ----- bodies ------------------------------------------------------------------------

/// `decode_request_body` never panics. When it accepts a body, its `args`
/// are exactly one MessagePack value that `rmpv` reads whole (the server
/// hands `args` to the handler's deserializer), `rmp_serde` may decode it as
/// an `rmpv::Value` without panicking, and re-encoding the request decodes
/// to the same names. (The value itself is not compared: `rmpv` re-encodes a
/// str holding invalid UTF-8 as a bin, which the first fuzzing run found.)
pub fn check_request_body(body: &[u8]) {
    let Ok(request) = decode_request_body(body) else {
        return;
    };
    let mut args = request.args;
    let value = rmpv::decode::read_value(&mut args)
        .unwrap_or_else(|e| panic!("accepted args that rmpv cannot read: {e} ({body:02x?})"));
    assert!(
        args.is_empty(),
        "args {:02x?} hold more than one value: rmpv read {} of {} bytes",
        request.args,
        request.args.len() - args.len(),
        request.args.len()
    );
    // Through serde, as a handler taking `rmpv::Value` would decode it. The
    // serde path may refuse some values (e.g. an ext type); it must not panic.
    let _ = rmp_serde::from_slice::<rmpv::Value>(request.args);
    let frame = encode_request(
        Kind::Request,
        1,
        request.service,
        request.version,
        request.group,
        request.method,
        &value,
    )
    .expect("a decoded request re-encodes");
    let again = decode_request_body(&frame[HEADER_LEN..]).expect("a re-encoded request decodes");
    assert_eq!(
        (again.service, again.version, again.group, again.method),
        (
            request.service,
            request.version,
            request.group,
            request.method
        )
    );
}

/// A Response (or Close) body as a consumer decodes it: an Ok response with
/// `rmp_serde` into the caller's type, an error response or a Close reason
/// with `decode_text_body`. Neither may panic, and an error text survives an
/// encode/decode round trip through `FrameDecoder` (cut to the 64 KiB limit
/// at a char boundary).
pub fn check_response_body(body: &[u8]) {
    let _ = decode_text_body(body);
    let _ = rmp_serde::from_slice::<rmpv::Value>(body);
    let _ = rmp_serde::from_slice::<u64>(body);
    let _ = rmp_serde::from_slice::<String>(body);
    let _ = rmp_serde::from_slice::<Vec<Option<(u8, String)>>>(body);
    let _ = rmpv::decode::read_value(&mut &body[..]);

    let message = String::from_utf8_lossy(body);
    let frame = encode_error_response(7, ResponseStatus::HandlerError, &message);
    let mut decoder = FrameDecoder::new(u32::MAX);
    decoder.feed(&frame);
    let decoded = decoder
        .next_frame()
        .expect("valid frame")
        .expect("whole frame");
    assert_eq!(decoded.header.id, 7);
    assert_eq!(decoded.body.len(), frame.len() - HEADER_LEN);
    let back = decode_text_body(&decoded.body);
    if message.len() <= 64 * 1024 {
        assert_eq!(back, message);
    } else {
        assert!(message.starts_with(&back) && back.len() <= 64 * 1024);
    }
}
