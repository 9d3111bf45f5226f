// Errors are fine, panics are bugs: any bytes may be rejected by the VHDX
// header, region table, metadata table, parent locator and log parsers,
// none may make them (or the round trips through their writers) panic. The
// first byte picks the parser. The body is `chainfs::fuzzing::vhdx_meta`,
// shared with `tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chainfs::fuzzing::vhdx_meta(data));
