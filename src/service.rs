//! Services and their typed methods, as registered on a [`crate::Server`].
//!
//! A service is identified by `(name, version, group)`. Each method takes one
//! `serde` value and returns one; pulse decodes the arguments and encodes the
//! result (MessagePack), answers `BadRequest` when the arguments do not fit the
//! parameter type and `HandlerError` when the handler fails or panics.

use std::collections::HashMap;
use std::fmt::Display;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::HandlerMode;
use crate::protocol::{ResponseStatus, encode_error_response, encode_ok_response};

/// A type-erased method: decodes arguments, runs, and encodes the whole
/// response frame for request `id`.
pub(crate) trait Handler: Send + Sync {
    fn invoke(&self, id: u64, args: &[u8]) -> Vec<u8>;
}

struct Typed<F, A, R, E> {
    handler: F,
    _types: PhantomData<fn(A) -> Result<R, E>>,
}

impl<F, A, R, E> Handler for Typed<F, A, R, E>
where
    F: Fn(A) -> Result<R, E> + Send + Sync,
    A: DeserializeOwned,
    R: Serialize,
    E: Display,
{
    fn invoke(&self, id: u64, args: &[u8]) -> Vec<u8> {
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
        match catch_unwind(AssertUnwindSafe(|| (self.handler)(args))) {
            Ok(Ok(result)) => encode_ok_response(id, &result).unwrap_or_else(|e| {
                encode_error_response(
                    id,
                    ResponseStatus::HandlerError,
                    &format!("result could not be encoded: {e}"),
                )
            }),
            Ok(Err(e)) => encode_error_response(id, ResponseStatus::HandlerError, &e.to_string()),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                log::error!("handler panicked: {what}");
                encode_error_response(
                    id,
                    ResponseStatus::HandlerError,
                    &format!("handler panicked: {what}"),
                )
            }
        }
    }
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
            Lookup::Found(m) => response(m.handler.invoke(9, args)),
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
