// Errors are fine, panics are bugs: any bytes may be rejected by
// `DynamicHeader::parse`, none may make it (or the round trip through
// `to_bytes`, or the locator decoders) panic. The body is
// `chainfs::fuzzing::vhd_header`, shared with `tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chainfs::fuzzing::vhd_header(data));
