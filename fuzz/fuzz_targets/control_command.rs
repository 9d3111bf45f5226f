// Errors are fine, panics are bugs: any bytes may be refused by the
// control-command parser, none may make it panic, and a command that
// parses must print as one line that parses back to the same command.
// The body is `chainfs::fuzzing::control_command`, shared with
// `tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chainfs::fuzzing::control_command(data));
