// Errors are fine, panics are bugs: the VHDX layout parser (headers, log
// replay, region and metadata tables, metadata items, BAT geometry) may
// reject any image, none may make it panic, and a layout it accepts must
// describe a disk its BAT can map. A short input is a list of patches over
// a valid image from chainfs's own writer (format in
// `chainfs::fuzzing::vhdx_layout`, shared with `tests/fuzz_replay.rs`); an
// input of 1 MiB or more is a whole image.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chainfs::fuzzing::vhdx_layout(data));
