//! Fuzz target `response_body`: arbitrary bytes as a Response (or Close) body.
//!
//! A consumer decodes an Ok response with `rmp_serde` into the caller's type
//! and an error response (or a Close reason) with `decode_text_body`. Neither
//! may panic, and an error text survives an encode/decode round trip (cut to
//! the 64 KiB limit at a char boundary).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pulse::protocol::{
    FrameDecoder, HEADER_LEN, ResponseStatus, decode_text_body, encode_error_response,
};

fuzz_target!(|body: &[u8]| {
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
});
