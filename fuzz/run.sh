#!/usr/bin/env bash
# Runs each fuzz target of pulse for $FUZZ_SECONDS seconds (default 60) and
# prints, per target, the executions done and whether it crashed.
#
#   fuzz/run.sh                          # every target, 60 s each
#   FUZZ_SECONDS=600 fuzz/run.sh frame_decoder
#
# cargo-fuzz drives libFuzzer and needs nightly compiler flags. The machines
# have only the stable toolchain, so by default it runs on stable with
# RUSTC_BOOTSTRAP=1 (set FUZZ_TOOLCHAIN=nightly to use a nightly toolchain
# instead) and with AddressSanitizer (FUZZ_SANITIZER=none turns it off).
# cargo-fuzz is installed from crates.io when missing.
#
# The fuzzers start from the committed seeds in fuzz/corpus/<target>/seed-*
# and add what they find to the same folder (ignored by git). A crash leaves
# its input in fuzz/artifacts/<target>/: turn it into a regression test in
# tests/decoders_arbitrary.rs, then fix the bug.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-60}
sanitizer=${FUZZ_SANITIZER:-address}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(frame_decoder request_body response_body)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
toolchain=()
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    toolchain=("+${FUZZ_TOOLCHAIN}")
else
    export RUSTC_BOOTSTRAP=1
fi

max_len() {
    case "$1" in
        frame_decoder) echo 131072 ;; # room for bodies past the decoder's 32 KiB "large body" path
        *) echo 8192 ;;
    esac
}

status=0
summary=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target" logs
    log="logs/$target.log"
    echo "== fuzzing $target for ${seconds}s (sanitizer: $sanitizer)"
    if cargo "${toolchain[@]}" fuzz run --sanitizer "$sanitizer" "$target" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$target")" -print_final_stats=1 \
        >"$log" 2>&1; then
        result="no crash"
    else
        result="CRASH (see fuzz/$log and fuzz/artifacts/$target/)"
        status=1
    fi
    runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | grep -Eo '[0-9]+' | tail -1 || true)
    if [ -z "$runs" ]; then
        runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1 || true)
    fi
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 || true)
    summary+=("$target: ${runs:-?} executions, ${cov:-cov: ?}, $result")
    tail -n 3 "$log"
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
