// Errors are fine, panics are bugs: any bytes may be refused by
// `Record::from_bytes` (the merge intent record), none may make it panic,
// and a record that parses must re-serialise and parse back equal. The
// body is `chainfs::fuzzing::intent_record`, shared with
// `tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chainfs::fuzzing::intent_record(data));
