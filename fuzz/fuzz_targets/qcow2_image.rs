// Errors are fine, panics are bugs: the input is a whole file (seeded with
// small qemu-made qcow2 images), opened read-only as one layer and read,
// checked and measured in a bounded way. Any file may be refused with an
// error; none may panic, hang, or get a layer to map bytes outside the
// file. The body is `chainfs::fuzzing::qcow2_image`, shared with
// `tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chainfs::fuzzing::qcow2_image(data));
