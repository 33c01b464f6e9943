//! Services and their typed methods, as registered on a [`crate::Server`].
//!
//! A service is identified by `(name, version, group)`. Each method takes one
//! `serde` value and returns one; pulse decodes the arguments and encodes the
//! result (MessagePack), answers `BadRequest` when the arguments do not fit the
//! parameter type (or their `Deserialize` panics) and `HandlerError` when the
//! handler fails or panics, when the result's `Serialize` or the error's
//! `Display` panics, or when the answer would be over `max_frame_len`.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt::Display;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::HandlerMode;
use crate::protocol::{
    HEADER_LEN, ResponseStatus, encode_error_response, encode_error_response_within,
    encode_ok_response,
};

/// A type-erased method: decodes arguments, runs, and encodes the whole
/// response frame for request `id`, whose body is at most `max_body` bytes.
pub(crate) trait Handler: Send + Sync {
    fn invoke(&self, id: u64, args: &[u8], max_body: u32) -> Vec<u8>;
}

struct Typed<F, A, R, E> {
    handler: F,
    _types: PhantomData<fn(A) -> Result<R, E>>,
}

/// The step of a call that was running when a panic came.
#[derive(Clone, Copy)]
enum Step {
    /// `A`'s `Deserialize`: the consumer's bytes chose what ran.
    Decode,
    /// The handler itself.
    Handle,
    /// `R`'s `Serialize` or `E`'s `Display`.
    Encode,
}

impl<F, A, R, E> Handler for Typed<F, A, R, E>
where
    F: Fn(A) -> Result<R, E> + Send + Sync,
    A: DeserializeOwned,
    R: Serialize,
    E: Display,
{
    fn invoke(&self, id: u64, args: &[u8], max_body: u32) -> Vec<u8> {
        // Every step runs user code (the handler, and the `Deserialize`,
        // `Serialize` and `Display` impls of its types), on an event loop or
        // a worker: a panic in any of them must cost only this call's answer,
        // never the thread and every connection or job it serves.
        let step = Cell::new(Step::Decode);
        let answered = catch_unwind(AssertUnwindSafe(|| self.answer(id, args, &step)));
        let response = answered.unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let (status, message) = match step.get() {
                Step::Decode => (
                    ResponseStatus::BadRequest,
                    format!(
                        "decoding the arguments into {} panicked: {what}",
                        std::any::type_name::<A>()
                    ),
                ),
                Step::Handle => (
                    ResponseStatus::HandlerError,
                    format!("handler panicked: {what}"),
                ),
                Step::Encode => (
                    ResponseStatus::HandlerError,
                    format!("encoding the handler's answer panicked: {what}"),
                ),
            };
            log::error!("{message}");
            encode_error_response(id, status, &message)
        });
        fit_response(response, id, max_body)
    }
}

impl<F, A, R, E> Typed<F, A, R, E>
where
    F: Fn(A) -> Result<R, E> + Send + Sync,
    A: DeserializeOwned,
    R: Serialize,
    E: Display,
{
    /// The response frame, noting in `step` what runs, for a panic's message.
    fn answer(&self, id: u64, args: &[u8], step: &Cell<Step>) -> Vec<u8> {
        let args: A = match rmp_serde::from_slice(args) {
            Ok(args) => args,
            Err(e) => {
                let message = format!(
                    "arguments do not fit the parameter type {}: {e}",
                    std::any::type_name::<A>()
                );
                return encode_error_response(id, ResponseStatus::BadRequest, &message);
            }
        };
        step.set(Step::Handle);
        let result = (self.handler)(args);
        step.set(Step::Encode);
        match result {
            Ok(result) => encode_ok_response(id, &result).unwrap_or_else(|e| {
                encode_error_response(
                    id,
                    ResponseStatus::HandlerError,
                    &format!("result could not be encoded: {e}"),
                )
            }),
            Err(e) => encode_error_response(id, ResponseStatus::HandlerError, &e.to_string()),
        }
    }
}

/// `response`, or a HandlerError in its place when its body is over
/// `max_body` bytes. A consumer with the same `max_frame_len` would close the
/// whole connection on such a frame (failing every call on it); answering
/// the one call with an error keeps the others.
fn fit_response(response: Vec<u8>, id: u64, max_body: u32) -> Vec<u8> {
    let body_len = response.len().saturating_sub(HEADER_LEN);
    if body_len <= max_body as usize {
        return response;
    }
    let message = format!(
        "the answer is {body_len} bytes, over max_frame_len ({max_body} bytes): \
         the consumer would close the connection on it"
    );
    log::warn!("request {id}: {message}");
    encode_error_response_within(id, ResponseStatus::HandlerError, &message, max_body)
}

/// A registered method and where it runs.
#[derive(Clone)]
pub(crate) struct Method {
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) mode: HandlerMode,
}

/// Builds one service: its identity and its methods.
///
/// ```
/// use pulse::ServiceBuilder;
/// let demo = ServiceBuilder::new("demo")
///     .method("ping", |n: u64| Ok::<_, String>(n))
///     .method("add", |(a, b): (i64, i64)| a.checked_add(b).ok_or("overflow"));
/// ```
pub struct ServiceBuilder {
    name: String,
    version: String,
    group: String,
    methods: HashMap<String, Method>,
}

impl ServiceBuilder {
    /// A service with this name, empty version and empty group.
    pub fn new(name: impl Into<String>) -> ServiceBuilder {
        ServiceBuilder {
            name: name.into(),
            version: String::new(),
            group: String::new(),
            methods: HashMap::new(),
        }
    }

    /// Sets the version (default empty).
    pub fn version(mut self, version: impl Into<String>) -> ServiceBuilder {
        self.version = version.into();
        self
    }

    /// Sets the group (default empty).
    pub fn group(mut self, group: impl Into<String>) -> ServiceBuilder {
        self.group = group.into();
        self
    }

    /// Adds a method run on the worker pool ([`HandlerMode::Pool`]), where it
    /// may block without delaying heartbeats. A second method with the same
    /// name replaces the first.
    pub fn method<A, R, E, F>(self, name: impl Into<String>, handler: F) -> ServiceBuilder
    where
        F: Fn(A) -> Result<R, E> + Send + Sync + 'static,
        A: DeserializeOwned + 'static,
        R: Serialize + 'static,
        E: Display + 'static,
    {
        self.method_with_mode(name, HandlerMode::Pool, handler)
    }

    /// Adds a method run on the event loop ([`HandlerMode::Inline`]): the
    /// fastest path, for handlers that are short and never block.
    pub fn method_inline<A, R, E, F>(self, name: impl Into<String>, handler: F) -> ServiceBuilder
    where
        F: Fn(A) -> Result<R, E> + Send + Sync + 'static,
        A: DeserializeOwned + 'static,
        R: Serialize + 'static,
        E: Display + 'static,
    {
        self.method_with_mode(name, HandlerMode::Inline, handler)
    }

    /// Adds a method that runs where `mode` says.
    pub fn method_with_mode<A, R, E, F>(
        mut self,
        name: impl Into<String>,
        mode: HandlerMode,
        handler: F,
    ) -> ServiceBuilder
    where
        F: Fn(A) -> Result<R, E> + Send + Sync + 'static,
        A: DeserializeOwned + 'static,
        R: Serialize + 'static,
        E: Display + 'static,
    {
        let handler = Arc::new(Typed {
            handler,
            _types: PhantomData,
        });
        self.methods.insert(name.into(), Method { handler, mode });
        self
    }
}

struct Service {
    version: String,
    group: String,
    methods: HashMap<String, Method>,
}

/// Every service of a server, looked up without allocating.
#[derive(Default)]
pub(crate) struct Registry {
    by_name: HashMap<String, Vec<Service>>,
}

/// Why a request found no method.
pub(crate) enum Lookup<'a> {
    Found(&'a Method),
    NoService,
    NoMethod,
}

impl Registry {
    /// Adds a service; one with the same identity is replaced.
    pub(crate) fn add(&mut self, builder: ServiceBuilder) {
        let versions = self.by_name.entry(builder.name).or_default();
        versions.retain(|s| s.version != builder.version || s.group != builder.group);
        versions.push(Service {
            version: builder.version,
            group: builder.group,
            methods: builder.methods,
        });
    }

    pub(crate) fn find(&self, name: &str, version: &str, group: &str, method: &str) -> Lookup<'_> {
        let service = self.by_name.get(name).and_then(|versions| {
            versions
                .iter()
                .find(|s| s.version == version && s.group == group)
        });
        match service {
            None => Lookup::NoService,
            Some(service) => match service.methods.get(method) {
                Some(method) => Lookup::Found(method),
                None => Lookup::NoMethod,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FrameDecoder, decode_text_body};

    fn response(frame: Vec<u8>) -> crate::protocol::Frame {
        let mut decoder = FrameDecoder::new(1 << 20);
        decoder.feed(&frame);
        decoder.next_frame().unwrap().unwrap()
    }

    fn registry() -> Registry {
        let mut registry = Registry::default();
        registry.add(
            ServiceBuilder::new("math")
                .method("double", |n: u64| n.checked_mul(2).ok_or("overflow"))
                .method("boom", |_: ()| -> Result<(), String> { panic!("kaboom") }),
        );
        registry.add(
            ServiceBuilder::new("math")
                .version("2")
                .method("double", |n: u64| Ok::<_, String>(n * 4)),
        );
        registry
    }

    fn call(
        registry: &Registry,
        version: &str,
        method: &str,
        args: &[u8],
    ) -> crate::protocol::Frame {
        match registry.find("math", version, "", method) {
            Lookup::Found(m) => response(m.handler.invoke(9, args, 1 << 20)),
            _ => panic!("method {method} not found"),
        }
    }

    #[test]
    fn typed_methods_decode_args_and_encode_results() {
        let r = registry();
        let frame = call(&r, "", "double", &rmp_serde::to_vec(&21u64).unwrap());
        assert_eq!(frame.header.id, 9);
        assert_eq!(frame.header.status, ResponseStatus::Ok as u8);
        assert_eq!(rmp_serde::from_slice::<u64>(&frame.body).unwrap(), 42);
        let frame = call(&r, "2", "double", &rmp_serde::to_vec(&21u64).unwrap());
        assert_eq!(rmp_serde::from_slice::<u64>(&frame.body).unwrap(), 84);
    }

    #[test]
    fn ill_typed_args_are_a_bad_request() {
        let frame = call(
            &registry(),
            "",
            "double",
            &rmp_serde::to_vec("seven").unwrap(),
        );
        assert_eq!(frame.header.status, ResponseStatus::BadRequest as u8);
        assert!(decode_text_body(&frame.body).contains("u64"));
    }

    #[test]
    fn handler_errors_and_panics_are_handler_errors() {
        let frame = call(
            &registry(),
            "",
            "double",
            &rmp_serde::to_vec(&u64::MAX).unwrap(),
        );
        assert_eq!(frame.header.status, ResponseStatus::HandlerError as u8);
        assert_eq!(decode_text_body(&frame.body), "overflow");
        let frame = call(&registry(), "", "boom", &rmp_serde::to_vec(&()).unwrap());
        assert_eq!(frame.header.status, ResponseStatus::HandlerError as u8);
        assert!(decode_text_body(&frame.body).contains("kaboom"));
    }

    #[test]
    fn an_answer_over_the_limit_becomes_a_handler_error_within_it() {
        let mut registry = Registry::default();
        registry.add(ServiceBuilder::new("math").method("bytes", |n: usize| {
            Ok::<_, String>(rmpv::Value::Binary(vec![7; n]))
        }));
        let Lookup::Found(method) = registry.find("math", "", "", "bytes") else {
            panic!("method not found");
        };
        let args = |n: usize| rmp_serde::to_vec(&n).unwrap();
        // 59 bytes + a 2-byte bin8 marker: exactly at a 61-byte limit.
        let at_limit = response(method.handler.invoke(1, &args(59), 61));
        assert_eq!(at_limit.header.status, ResponseStatus::Ok as u8);
        // One more byte: an error, itself cut to fit the smallest limit.
        for max_body in [64, 1 << 20] {
            let over = response(method.handler.invoke(1, &args(max_body as usize), max_body));
            assert_eq!(over.header.status, ResponseStatus::HandlerError as u8);
            assert!(over.body.len() <= max_body as usize);
            assert!(decode_text_body(&over.body).starts_with("the answer is"));
        }
    }

    #[test]
    fn lookups_tell_a_missing_service_from_a_missing_method() {
        let r = registry();
        assert!(matches!(
            r.find("nope", "", "", "double"),
            Lookup::NoService
        ));
        assert!(matches!(
            r.find("math", "3", "", "double"),
            Lookup::NoService
        ));
        assert!(matches!(r.find("math", "", "", "triple"), Lookup::NoMethod));
    }
}
