// Errors are fine, panics are bugs: any 512 bytes may be rejected by
// `Footer::parse`, none may make it (or the round trip through `to_bytes`)
// panic. The body is `chainfs::fuzzing::vhd_footer`, shared with
// `tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chainfs::fuzzing::vhd_footer(data));
