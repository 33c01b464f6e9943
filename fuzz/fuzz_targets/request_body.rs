//! Fuzz target `request_body`: arbitrary bytes as a Request/OneWay body.
//!
//! `decode_request_body` must never panic. When it accepts a body, its
//! `args` must be exactly one MessagePack value that `rmpv` reads whole (the
//! server hands `args` to the handler's deserializer), `rmp_serde` must decode
//! it as an `rmpv::Value`, and re-encoding the request must decode to the same
//! names. (The value itself is not compared: `rmpv` re-encodes a str holding
//! invalid UTF-8 as a bin, which the first run of this target found.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use pulse::protocol::{HEADER_LEN, Kind, decode_request_body, encode_request};

fuzz_target!(|body: &[u8]| {
    let Ok(request) = decode_request_body(body) else {
        return;
    };
    let mut args = request.args;
    let value = rmpv::decode::read_value(&mut args)
        .unwrap_or_else(|e| panic!("accepted args that rmpv cannot read: {e}"));
    assert!(
        args.is_empty(),
        "rmpv read {} of {} args bytes",
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
});
