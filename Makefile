# pulse: the commands a newcomer needs. `make help` lists them.
#
# Everything is plain cargo with a Rust toolchain with rustfmt and clippy
# (`rustup component add rustfmt clippy`); `make test` also installs Debian's
# etcd-server when no `etcd` binary is found (the registry tests need one).

CARGO ?= cargo

.PHONY: help run test bench fuzz fmt clean etcd-install iproute2-install etcd-start etcd-stop

FUZZ_SECONDS ?= 60

help:
	@echo "make run    build in release mode and run the ping_pong demo (provider + consumer, 1000 calls)"
	@echo "make test   installs etcd if missing, then formatting check, clippy and rustdoc (warnings are errors), every test target, doc tests"
	@echo "make bench  run the benchmarks (they report; they never fail the build)"
	@echo "make fuzz   run each fuzz target for FUZZ_SECONDS s (default 60); installs cargo-fuzz if missing"
	@echo "make fmt    format the code"
	@echo "make clean  remove build output"
	@echo "make etcd-start / etcd-stop   a local etcd on 127.0.0.1:23790 for the cluster example"

run:
	$(CARGO) run --release --example ping_pong

# clippy --all-targets compiles everything, the bench included. The test run
# names its targets: `--all-targets` would also *run* the `harness = false`
# bench (whatever `test = false` says), which is `make bench`'s job. Doc tests
# (crate docs and the README's examples) run last. The docs are built with
# the private items too and warnings as errors: a broken link in a doc
# comment fails the build, as a clippy warning does.
# tests/etcd.rs needs a real etcd: each test starts its own on free ports and
# kills it by PID. etcd-install installs Debian's etcd-server when `etcd` is
# missing (a fresh machine), so `make test` works from a clean clone.
# tests/partition.rs sets up routes in network namespaces of its own with
# iproute2's `ip`; iproute2-install installs it when `ip` is missing.
test: etcd-install iproute2-install
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --document-private-items
	$(CARGO) test --lib --bins --tests --examples
	$(CARGO) test --doc

bench:
	$(CARGO) bench --bench pulse_bench

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

etcd-install:
	scripts/etcd.sh install

iproute2-install:
	@if command -v ip >/dev/null 2>&1; then \
		echo "ip: $$(command -v ip) is installed"; \
	else \
		echo "ip: not installed; installing Debian's iproute2"; \
		sudo=""; if [ "$$(id -u)" != 0 ]; then sudo=sudo; fi; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq iproute2 >/dev/null; \
	fi

etcd-start:
	scripts/etcd.sh start

etcd-stop:
	scripts/etcd.sh stop

fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh
