# pulse: the commands a newcomer needs. `make help` lists them.
#
# Everything is plain cargo: nothing to install beyond a Rust toolchain with
# rustfmt and clippy (`rustup component add rustfmt clippy`).

CARGO ?= cargo

.PHONY: help run test bench fmt clean

help:
	@echo "make run    build in release mode and run the ping_pong demo (provider + consumer, 1000 calls)"
	@echo "make test   formatting check, clippy (warnings are errors), every test target, doc tests"
	@echo "make bench  run the benchmarks (they report; they never fail the build)"
	@echo "make fmt    format the code"
	@echo "make clean  remove build output"

run:
	$(CARGO) run --release --example ping_pong

# `--all-targets` builds and runs the unit and integration tests and builds the
# examples; it does not run doc tests, hence the second run. It also *runs* the
# `harness = false` bench (without the `--bench` flag `cargo bench` passes), so
# the bench is asked for its quick smoke run here.
test:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --all-targets
	$(CARGO) test --doc

bench:
	$(CARGO) bench --bench pulse_bench

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
