//! The plugin's `key=value` parameters, mapped onto [`chainfs::ChainOptions`]
//! with the same meaning as the CLI's options of the same names.

use std::path::PathBuf;

use chainfs::ChainOptions;

pub const HELP: &str = "\
leaf=PATH               (required) the leaf of the chain (.vhd, .avhd, .vhdx, .avhdx)
parent_dir=DIR          also look for parents in DIR, by file name (repeatable)
parent=CHILD=PATH       use PATH as CHILD's parent, no search (repeatable)
readonly=BOOL           serve read-only: shared locks, no writes (default false)
force=BOOL              open a writable leaf even if other disks depend on it
ignore_id_mismatch=BOOL use a parent whose identity differs from the record
cache=SIZE              metadata cache budget (default: chainfs's default)";

#[derive(Clone, Debug, Default)]
pub struct Config {
    pub leaf: Option<PathBuf>,
    pub parent_dirs: Vec<PathBuf>,
    pub overrides: Vec<(PathBuf, PathBuf)>,
    pub readonly: bool,
    pub force: bool,
    pub ignore_id_mismatch: bool,
    pub cache_bytes: usize,
}

/// Relative paths are taken from nbdkit's working directory at start-up
/// (nbdkit changes to `/` when it forks into the background).
fn path(v: &str) -> PathBuf {
    std::path::absolute(v).unwrap_or_else(|_| PathBuf::from(v))
}

fn boolean(key: &str, v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("chainfs: {key}={v}: expected true or false")),
    }
}

fn size(key: &str, v: &str) -> Result<usize, String> {
    let bad = || format!("chainfs: {key}={v}: expected a size such as 64M");
    let (num, mult) = match v.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m: u64 = match v[i..].to_ascii_uppercase().as_str() {
                "K" | "KB" | "KIB" => 1 << 10,
                "M" | "MB" | "MIB" => 1 << 20,
                "G" | "GB" | "GIB" => 1 << 30,
                _ => return Err(bad()),
            };
            (&v[..i], m)
        }
        None => (v, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(bad)
}

/// nbdkit's options that take a value (short letters, long names), from
/// `nbdkit --help` (1.32): a value never counts as an option of its own.
const SHORT_WITH_VALUE: &str = "DegiPptUu";
const LONG_WITH_VALUE: &[&str] = &[
    "debug",
    "exportname",
    "filter",
    "group",
    "ipaddr",
    "log",
    "mask-handshake",
    "pidfile",
    "port",
    "run",
    "selinux-label",
    "threads",
    "tls",
    "tls-certificates",
    "tls-psk",
    "unix",
    "user",
];

/// Was nbdkit started with `-r` (`--readonly`, `--read-only`, or `r` among
/// combined short flags such as `-fr`)? `args` is nbdkit's command line
/// without the program name. nbdkit tells a plugin about `-r` only per
/// connection, after the chain is open; a read-only server must open it
/// read-only (shared locks, no log replay or repair at open), so the
/// plugin reads the command line itself.
pub fn nbdkit_readonly(args: &[String]) -> bool {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            match long {
                "readonly" | "read-only" => return true,
                l if LONG_WITH_VALUE.contains(&l) => {
                    it.next();
                }
                _ => {}
            }
        } else if let Some(short) = a.strip_prefix('-') {
            for (i, c) in short.char_indices() {
                if c == 'r' {
                    return true;
                }
                if SHORT_WITH_VALUE.contains(c) {
                    // The rest of this argument, or the next one, is its value.
                    if i + c.len_utf8() == short.len() {
                        it.next();
                    }
                    break;
                }
            }
        }
    }
    false
}

impl Config {
    /// Take one parameter; the error names it and says what is expected.
    pub fn set(&mut self, key: &str, v: &str) -> Result<(), String> {
        match key {
            "leaf" => {
                if self.leaf.is_some() {
                    return Err(format!("chainfs: leaf={v}: only one leaf may be given"));
                }
                self.leaf = Some(path(v));
            }
            "parent_dir" => self.parent_dirs.push(path(v)),
            "parent" => {
                let (c, p) = v
                    .split_once('=')
                    .filter(|(c, p)| !c.is_empty() && !p.is_empty())
                    .ok_or_else(|| format!("chainfs: parent={v}: expected parent=CHILD=PATH"))?;
                self.overrides.push((path(c), path(p)));
            }
            "readonly" => self.readonly = boolean(key, v)?,
            "force" => self.force = boolean(key, v)?,
            "ignore_id_mismatch" => self.ignore_id_mismatch = boolean(key, v)?,
            "cache" => self.cache_bytes = size(key, v)?,
            _ => {
                return Err(format!(
                    "chainfs: unknown parameter {key}={v} (see nbdkit chainfs --help)"
                ))
            }
        }
        Ok(())
    }

    pub fn chain_options(&self) -> ChainOptions {
        ChainOptions {
            writable: !self.readonly,
            parent_dirs: self.parent_dirs.clone(),
            overrides: self.overrides.clone(),
            ignore_id_mismatch: self.ignore_id_mismatch,
            cache_bytes: self.cache_bytes,
            force: self.force,
            force_hint: "`force=true`",
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let mut c = Config::default();
        c.set("leaf", "/vms/leaf.vhdx").unwrap();
        c.set("parent_dir", "/base").unwrap();
        c.set("parent", "/vms/leaf.vhdx=/base/b.vhdx").unwrap();
        c.set("readonly", "yes").unwrap();
        c.set("cache", "64M").unwrap();
        let o = c.chain_options();
        assert!(!o.writable);
        assert_eq!(o.parent_dirs, vec![PathBuf::from("/base")]);
        assert_eq!(o.overrides[0].1, PathBuf::from("/base/b.vhdx"));
        assert_eq!(o.cache_bytes, 64 << 20);
    }

    #[test]
    fn nbdkit_readonly_is_found_among_its_options_only() {
        let ro = |a: &[&str]| nbdkit_readonly(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ro(&["-r", "-U", "/s", "chainfs", "leaf=/x"]));
        assert!(ro(&["-fr", "chainfs", "leaf=/x"]));
        assert!(ro(&["--readonly", "chainfs"]));
        assert!(ro(&["--read-only", "chainfs"]));
        assert!(ro(&["-f", "-U", "-", "-r", "chainfs"]));
        // Values of options are not options.
        assert!(!ro(&["-U", "-r", "chainfs", "leaf=/x"]));
        assert!(!ro(&["-e", "-r", "chainfs"]));
        assert!(!ro(&["--run", "-r", "chainfs"]));
        assert!(!ro(&["-Ur", "chainfs"]), "-U takes r as its socket name");
        assert!(!ro(&["-f", "--exit-with-parent", "chainfs", "leaf=/x"]));
        assert!(!ro(&["--", "-r"]));
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = Config::default();
        assert!(c
            .set("readonly", "maybe")
            .unwrap_err()
            .contains("readonly=maybe"));
        assert!(c.set("parent", "x").unwrap_err().contains("CHILD=PATH"));
        assert!(c
            .set("colour", "red")
            .unwrap_err()
            .contains("unknown parameter colour"));
        assert!(c.set("cache", "12Q").unwrap_err().contains("cache=12Q"));
        c.set("leaf", "a").unwrap();
        assert!(c.set("leaf", "b").unwrap_err().contains("only one leaf"));
    }
}
