#!/usr/bin/env bash
# The whole check: prerequisites, formatting, lints, every test.
# Mount and loop-device tests need root, /dev/fuse and loop devices; with
# CI=true they fail when those are missing, otherwise they skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo fmt --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --locked --all-targets
# The nbdkit plugin (a cdylib, workspace member); tests/nbd.rs serves it.
cargo build --locked -p nbdkit-chainfs-plugin
# The cargo-fuzz targets build on stable too (running them needs
# RUSTC_BOOTSTRAP=1, see scripts/fuzz.sh); their corpus replays in the suite.
cargo build --locked --manifest-path fuzz/Cargo.toml
cargo nextest run --workspace --locked --no-fail-fast --profile ci
cargo test --locked --doc
