//! Fuzz target `request_body`: arbitrary bytes as a Request/OneWay body.
//!
//! Oracle: `decoder_oracle::check_request_body`, shared with
//! `tests/decoders_arbitrary.rs`: `decode_request_body` must never panic, and
//! a body it accepts holds `args` that are exactly one MessagePack value and
//! re-encodes to the same names.
#![no_main]

#[path = "../../tests/support/decoder_oracle.rs"]
mod decoder_oracle;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    decoder_oracle::check_request_body(body);
});
