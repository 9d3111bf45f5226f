//! The fuzz targets on stable `cargo test`: every seed in `fuzz/corpus/*`
//! and every saved crash in `fuzz/regressions/*` goes through the same
//! `chainfs::fuzzing` function the cargo-fuzz target calls, and a short,
//! deterministic mutation loop (a seeded xorshift RNG, a fixed count of
//! inputs, a time cap as a safety net) shakes the seeds on every run.
//!
//! Errors are fine, panics are bugs. A panicking input found by the loop is
//! written to the temp folder and its path printed: copy it to
//! `fuzz/regressions/TARGET/<what-it-shows>` so that it is replayed forever.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chainfs::format::vhd::checksum;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("vhd_footer", chainfs::fuzzing::vhd_footer),
    ("vhd_header", chainfs::fuzzing::vhd_header),
    ("vhd_image", chainfs::fuzzing::vhd_image),
    ("qcow2_image", chainfs::fuzzing::qcow2_image),
    ("vhdx_meta", chainfs::fuzzing::vhdx_meta),
    ("vhdx_layout", chainfs::fuzzing::vhdx_layout),
    ("qcow2_header", chainfs::fuzzing::qcow2_header),
    ("control_command", chainfs::fuzzing::control_command),
    ("intent_record", chainfs::fuzzing::intent_record),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn target(name: &str) -> Target {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no chainfs::fuzzing function for fuzz target {name}"))
        .1
}

/// Files directly under `dir` (none if it does not exist), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    v.sort();
    v
}

/// Run `f` on `data`; the panic message if it panicked.
fn try_one(f: Target, data: &[u8]) -> Option<String> {
    catch_unwind(AssertUnwindSafe(|| f(data))).err().map(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into())
    })
}

fn replay(kind: &str, name: &str) -> usize {
    let f = target(name);
    let dir = fuzz_dir().join(kind).join(name);
    let inputs = files(&dir);
    let mut failed = Vec::new();
    for p in &inputs {
        let data = std::fs::read(p).unwrap();
        if let Some(msg) = try_one(f, &data) {
            failed.push(format!("{}: {msg}", p.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: {} of {} inputs in {} panic:\n{}",
        failed.len(),
        inputs.len(),
        dir.display(),
        failed.join("\n")
    );
    inputs.len()
}

#[test]
fn every_corpus_dir_has_a_target_and_seeds() {
    for e in std::fs::read_dir(fuzz_dir().join("corpus")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        target(&name);
    }
    for (name, _) in TARGETS {
        assert!(
            !files(&fuzz_dir().join("corpus").join(name)).is_empty(),
            "no seed corpus for {name}"
        );
    }
    if let Ok(rd) = std::fs::read_dir(fuzz_dir().join("regressions")) {
        for e in rd {
            target(&e.unwrap().file_name().to_string_lossy());
        }
    }
}

#[test]
fn replay_vhd_footer() {
    replay("corpus", "vhd_footer");
    replay("regressions", "vhd_footer");
}

#[test]
fn replay_vhd_header() {
    replay("corpus", "vhd_header");
    replay("regressions", "vhd_header");
}

#[test]
fn replay_vhdx_meta() {
    replay("corpus", "vhdx_meta");
}

#[test]
fn replay_vhdx_layout() {
    replay("corpus", "vhdx_layout");
    replay("regressions", "vhdx_layout");
}

#[test]
fn replay_qcow2_header() {
    replay("corpus", "qcow2_header");
    replay("regressions", "qcow2_header");
}

#[test]
fn replay_vhd_image() {
    replay("corpus", "vhd_image");
    replay("regressions", "vhd_image");
}

#[test]
fn replay_control_command() {
    replay("corpus", "control_command");
    replay("regressions", "control_command");
}

#[test]
fn replay_intent_record() {
    replay("corpus", "intent_record");
    replay("regressions", "intent_record");
}

// ---------------------------------------------------------------------------
// Deterministic mutation

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.next() % one_in == 0
    }
}

/// Values that sit on the edges offset arithmetic cares about.
fn interesting(rng: &mut Rng, len: usize) -> u64 {
    const V: &[u64] = &[
        0,
        1,
        511,
        512,
        513,
        1024,
        1536,
        4096,
        0x7FFF_FFFF,
        0x8000_0000,
        0xFFFF_FFFE,
        0xFFFF_FFFF,
        0x1_0000_0000,
        0xFF00_0000 * 512,
        0xFF00_0000 * 512 + 512,
        i64::MAX as u64,
        u64::MAX - 511,
        u64::MAX - 1,
        u64::MAX,
    ];
    match rng.below(4) {
        0 => len as u64 + rng.below(1024) as u64,
        1 => (len as u64 / 512) + rng.below(4) as u64,
        _ => V[rng.below(V.len())],
    }
}

/// Fields worth hitting directly: (offset from the structure start, width).
const FOOTER_FIELDS: &[(usize, usize)] = &[(8, 4), (12, 4), (16, 8), (48, 8), (60, 4), (68, 16)];
const HEADER_FIELDS: &[(usize, usize)] = &[
    (16, 8),
    (24, 4),
    (28, 4),
    (32, 4),
    (40, 16),
    (576, 4),
    (580, 4),
    (584, 4),
    (592, 8),
    (600, 4),
    (608, 4),
    (616, 8),
];

fn put(data: &mut [u8], off: usize, width: usize, v: u64) {
    if off + width > data.len() {
        return;
    }
    let be = v.to_be_bytes();
    match width {
        4 => data[off..off + 4].copy_from_slice(&be[4..]),
        8 => data[off..off + 8].copy_from_slice(&be),
        _ => data[off..off + width].iter_mut().for_each(|b| *b = v as u8),
    }
}

/// Where the structures of `target` sit in an input of this length:
/// footers and headers, as (offset, is_footer); none for the text targets.
fn structures(target: &str, len: usize) -> Vec<(usize, bool)> {
    match target {
        "vhd_footer" => vec![(0, true)],
        "vhd_header" => vec![(0, false)],
        "control_command" | "intent_record" | "vhdx_layout" | "qcow2_header" | "qcow2_image" => {
            vec![]
        }
        _ => {
            let mut v = vec![(0, true), (512, false)];
            if len >= 512 {
                v.push((len - 512, true));
            }
            v
        }
    }
}

fn fix_checksums(target: &str, data: &mut [u8]) {
    for (at, is_footer) in structures(target, data.len()) {
        let (size, field) = if is_footer { (512, 64) } else { (1024, 36) };
        if at + size <= data.len() {
            let c = checksum(&data[at..at + size], field);
            data[at + field..at + field + 4].copy_from_slice(&c.to_be_bytes());
        }
    }
}

fn mutate(rng: &mut Rng, target: &str, seeds: &[Vec<u8>], data: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(6) {
        let len = data.len();
        match rng.below(10) {
            // A bit flip anywhere.
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            // A random byte anywhere.
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            // An interesting value into a known field of a structure.
            2..=4 if !structures(target, len).is_empty() => {
                let st = structures(target, len);
                let (at, is_footer) = st[rng.below(st.len())];
                let fields = if is_footer {
                    FOOTER_FIELDS
                } else {
                    HEADER_FIELDS
                };
                let (off, width) = fields[rng.below(fields.len())];
                let v = interesting(rng, len);
                put(data, at + off, width, v);
            }
            // An interesting u32 anywhere 4-aligned (BAT entries, lengths).
            5 if len >= 4 => {
                let i = rng.below(len / 4) * 4;
                let v = interesting(rng, len);
                put(data, i, 4, v);
            }
            // Truncate.
            6 if len > 0 => {
                let n = rng.below(len);
                data.truncate(n);
            }
            // Grow with zeros or garbage.
            7 => {
                let n = 1 + rng.below(4096);
                let fill = if rng.chance(2) { 0 } else { rng.next() as u8 };
                data.extend(std::iter::repeat_n(fill, n));
            }
            // Splice a chunk of another seed at the same offset.
            8 => {
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() && len > 0 {
                    let at = rng.below(len.min(other.len()));
                    let n = (1 + rng.below(1024)).min(other.len() - at).min(len - at);
                    data[at..at + n].copy_from_slice(&other[at..at + n]);
                }
            }
            // Move the last 512 bytes (a footer) somewhere else, or
            // drop it: the fallback paths.
            _ => {
                if len >= 1024 {
                    let tail = data[len - 512..].to_vec();
                    let at = rng.below(len / 512) * 512;
                    data[at..at + 512].copy_from_slice(&tail);
                }
            }
        }
    }
    if rng.chance(2) {
        fix_checksums(target, data);
    }
}

/// A safety net for slow machines: the loops are sized to take a second or
/// two, and stop here whatever the count (then less is covered, and the
/// run is no longer the same on every machine: the message says so).
const TIME_CAP: Duration = Duration::from_secs(15);

fn mutation_loop(name: &str, rng_seed: u64, max_inputs: usize) {
    let f = target(name);
    // Seeds only: a saved regression that is not fixed yet fails its
    // replay test above, and must not fail this one too.
    let seeds: Vec<Vec<u8>> = files(&fuzz_dir().join("corpus").join(name))
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert!(!seeds.is_empty(), "no seeds for {name}");
    let mut rng = Rng(rng_seed);
    let start = Instant::now();
    let mut crashes = Vec::new();
    let mut n = 0;
    while n < max_inputs && start.elapsed() < TIME_CAP {
        let mut data = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, name, &seeds, &mut data);
        if let Some(msg) = try_one(f, &data) {
            // Keep the first few; one bug tends to show up many times.
            if crashes.len() < 5 {
                let p = std::env::temp_dir().join(format!("chainfs-{name}-crash-{rng_seed:x}-{n}"));
                std::fs::write(&p, &data).unwrap();
                crashes.push(format!("{}: {msg}", p.display()));
            } else {
                crashes.push(format!("input {n} (not saved): {msg}"));
            }
        }
        n += 1;
    }
    eprintln!("{name}: {n} mutated inputs in {:?}", start.elapsed());
    if n < max_inputs {
        eprintln!("{name}: stopped by the {TIME_CAP:?} cap after {n} of {max_inputs} inputs");
    }
    assert!(
        crashes.is_empty(),
        "{name}: {} of {n} mutated inputs panic (saved; copy them to fuzz/regressions/{name}/):\n{}",
        crashes.len(),
        crashes.join("\n")
    );
}

#[test]
fn mutate_vhd_footer() {
    mutation_loop("vhd_footer", 0x00F0_07E4, 100_000);
}

#[test]
fn mutate_vhd_header() {
    mutation_loop("vhd_header", 0x004E_ADE4, 100_000);
}

#[test]
fn mutate_control_command() {
    mutation_loop("control_command", 0xC0_4D, 30_000);
}

#[test]
fn mutate_intent_record() {
    mutation_loop("intent_record", 0x1_4E47, 20_000);
}

#[test]
fn mutate_vhdx_layout() {
    mutation_loop("vhdx_layout", 0x001A_7047, 20_000);
}

#[test]
fn mutate_qcow2_header() {
    mutation_loop("qcow2_header", 0x9C03, 50_000);
}

#[test]
fn mutate_vhd_image() {
    mutation_loop("vhd_image", 0x1A6E, 12_000);
}

#[test]
fn replay_qcow2_image() {
    replay("corpus", "qcow2_image");
    replay("regressions", "qcow2_image");
}

#[test]
fn mutate_qcow2_image() {
    mutation_loop("qcow2_image", 0x9C02, 8_000);
}
