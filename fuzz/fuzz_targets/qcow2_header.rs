// Errors are fine, panics are bugs: the qcow2 header parser (header
// extensions, backing file name, feature bits) and the L1/L2/refcount
// entry and snapshot table decoders may reject any bytes, none may panic,
// and what parses must round-trip through the writer. The body is
// `chainfs::fuzzing::qcow2_header`, shared with `tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chainfs::fuzzing::qcow2_header(data));
