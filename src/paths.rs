//! Path rules shared by every module that names files: the folder a file
//! is in, a canonical form for comparing two names of one file, and how a
//! parent name stored inside an image (by any writer, in any shape) is
//! turned back into a local path. Format drivers store and decode bytes;
//! deciding which file a stored name means happens here, once.

use std::path::{Path, PathBuf};

/// The folder a file is in (`.` for a bare file name).
pub fn folder_of(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Absolute, symlinks resolved where possible.
pub fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| std::path::absolute(p).unwrap_or(p.to_path_buf()))
}

/// Which file a path names: its device and inode, following symlinks.
/// Two names of one file (hard links, symlinks, `..` forms) have the same
/// id, which is how the chain tells a loop and dependents tell a parent;
/// `None` when the path names nothing.
pub fn file_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// Do `a` and `b` name the same file? By [`file_id`] where both exist,
/// else by [`canonical`] path.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (file_id(a), file_id(b)) {
        (Some(x), Some(y)) => x == y,
        _ => canonical(a) == canonical(b),
    }
}

/// The local path a parent name stored in a child stands for, seen from
/// the child's folder `dir`; `None` when it cannot name a file here.
///
/// Every shape any writer uses is accepted: `/` or `\` separators,
/// absolute POSIX or rooted Windows paths (`\vms\b\p.vhd`), relative
/// forms (`p.vhd`, `.\p.vhd`, `../b/p.vhd`, `..\b\p.vhd`) resolved from the
/// child's folder, and `file://host/path` URLs (VHD `MacX`). Drive-letter
/// and UNC paths (`C:\…`, `\\?\…`) do not name a local file; the chain
/// search still tries their file name.
pub fn hint_path(dir: &Path, stored: &str) -> Option<PathBuf> {
    let s = stored.trim_end_matches('\0');
    if let Some(rest) = s.strip_prefix("file://") {
        return file_url_path(rest);
    }
    if s.is_empty() || s.starts_with("\\\\") || s.starts_with("//") {
        return None;
    }
    let b = s.as_bytes();
    if b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic() {
        return None; // C:\… or C:…
    }
    let s = s.replace('\\', "/");
    if s.starts_with('/') {
        return Some(PathBuf::from(s));
    }
    let mut rest = s.as_str();
    while let Some(r) = rest.strip_prefix("./") {
        rest = r.trim_start_matches('/');
    }
    (!rest.is_empty() && rest != ".").then(|| dir.join(rest))
}

/// `host/dir/x.vhd` (after `file://`) to `/dir/x.vhd`, percent-decoded.
fn file_url_path(rest: &str) -> Option<PathBuf> {
    let path = &rest[rest.find('/')?..];
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Some(PathBuf::from(String::from_utf8_lossy(&out).into_owned()))
}

/// The last part of a stored parent name (either separator), if any.
pub fn stored_basename(stored: &str) -> Option<String> {
    let b = stored.trim_end_matches('\0').rsplit(['\\', '/']).next()?;
    (!b.is_empty()).then(|| b.to_string())
}

/// Where to look for the parent a child at `child` names with the `stored`
/// parent names of its link, in order: each name as a path (relative to
/// the child's folder, absolute, Windows forms), then each base name in the
/// child's folder, then in each of `parent_dirs` (the `--parent-dir`s).
pub fn candidates(child: &Path, stored: &[&str], parent_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let dir = folder_of(child);
    let mut out: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    stored
        .iter()
        .filter_map(|s| hint_path(dir, s))
        .for_each(&mut push);
    let names: Vec<String> = stored.iter().filter_map(|s| stored_basename(s)).collect();
    for n in &names {
        push(dir.join(n));
    }
    for d in parent_dirs {
        for n in &names {
            push(d.join(n));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_shape() {
        let d = Path::new("/vms/a");
        let cases = [
            ("p.vhd", Some("/vms/a/p.vhd")),
            (".\\p.vhd", Some("/vms/a/p.vhd")),
            ("./p.vhd", Some("/vms/a/p.vhd")),
            ("../b/p.vhd", Some("/vms/a/../b/p.vhd")),
            ("..\\b\\p.vhd", Some("/vms/a/../b/p.vhd")),
            (".\\sub\\p.vhd", Some("/vms/a/sub/p.vhd")),
            ("/vms/b/p.vhd", Some("/vms/b/p.vhd")),
            ("\\vms\\b\\p.vhd", Some("/vms/b/p.vhd")),
            ("p.vhd\0\0", Some("/vms/a/p.vhd")),
            ("C:\\Hyper-V\\p.vhd", None),
            ("c:p.vhd", None),
            ("\\\\?\\C:\\p.vhd", None),
            ("\\\\server\\share\\p.vhd", None),
            ("", None),
            ("file://localhost/a%20b/p.vhd", Some("/a b/p.vhd")),
            ("file:///x.vhd", Some("/x.vhd")),
            (".\\", None),
        ];
        for (stored, want) in cases {
            assert_eq!(hint_path(d, stored), want.map(PathBuf::from), "{stored:?}");
        }
    }
}
