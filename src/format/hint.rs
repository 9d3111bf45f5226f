//! Parent path hints: what a child writes into the fields that name its
//! parent's location, and how a stored value is turned back into a local
//! path. Shared by the VHD and VHDX drivers so both formats agree.
//!
//! Writing (the reasons are in docs/FORMATS.md, "What chainfs writes"):
//!
//! | field | value for child `/vms/a/c.vhd` and parent `/vms/b/p.vhd` |
//! |---|---|
//! | Windows absolute (`W2ku`, `absolute_win32_path`) | `\vms\b\p.vhd` ([`windows_absolute`]) |
//! | Windows relative (`W2ru`, `relative_path`) | `..\b\p.vhd`, `.\p.vhd` in the same folder ([`windows_relative`]) |
//! | VHD header parent name | `../b/p.vhd`, `p.vhd` in the same folder ([`header_name`]) |
//!
//! Windows fields hold Windows-shaped paths (backslashes), never a POSIX
//! path: libvhdi takes the part after the last `\` and Windows resolves
//! backslash paths. The VHD header name follows Xen Orchestra's vhd-lib: a
//! path relative to the child's folder with `/`, which libvhdi (it joins the
//! part after the last `\` to the child's folder) and vhd-lib both follow.
//!
//! Reading ([`local_path`]) accepts every shape any writer uses: `/` or `\`
//! separators, absolute POSIX or rooted Windows paths (`\vms\b\p.vhd`), and
//! relative forms (`p.vhd`, `.\p.vhd`, `../b/p.vhd`, `..\b\p.vhd`) resolved
//! from the child's folder. Drive-letter and UNC paths (`C:\…`, `\\?\…`) do
//! not name a local file; the chain search still tries their file name.

use std::path::{Component, Path, PathBuf};

/// The local path a stored hint stands for, seen from the child's folder
/// `dir`; `None` when it cannot name a file here.
pub fn local_path(dir: &Path, stored: &str) -> Option<PathBuf> {
    let s = stored.trim_end_matches('\0');
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

/// `abs` (an absolute local path) written the Windows way: `\vms\b\p.vhd`.
pub fn windows_absolute(abs: &Path) -> String {
    let parts: Vec<String> = abs
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    format!("\\{}", parts.join("\\"))
}

/// The parts of the path from folder `from` to `to` (both absolute).
fn relative_parts(from: &Path, to: &Path) -> Vec<String> {
    let a: Vec<Component> = from.components().collect();
    let b: Vec<Component> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = (common..a.len()).map(|_| "..".to_string()).collect();
    parts.extend(
        b[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts
}

/// `to` relative to the folder `from`, written as Hyper-V writes relative
/// locators: `.\p.vhd` in the same folder, `..\b\p.vhd` elsewhere.
pub fn windows_relative(from: &Path, to: &Path) -> String {
    let parts = relative_parts(from, to);
    if parts.first().map(String::as_str) == Some("..") {
        parts.join("\\")
    } else {
        format!(".\\{}", parts.join("\\"))
    }
}

/// The VHD header's parent name for a child in folder `from` and a parent
/// at `to`: the file name in the same folder, else the relative path with
/// `/` (`../b/p.vhd`), as vhd-lib writes it.
pub fn header_name(from: &Path, to: &Path) -> String {
    relative_parts(from, to).join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_windows_shapes() {
        let (a, p) = (Path::new("/vms/a"), Path::new("/vms/a/p.vhd"));
        assert_eq!(windows_relative(a, p), ".\\p.vhd");
        assert_eq!(header_name(a, p), "p.vhd");
        let q = Path::new("/vms/b/q.vhd");
        assert_eq!(windows_relative(a, q), "..\\b\\q.vhd");
        assert_eq!(header_name(a, q), "../b/q.vhd");
        assert_eq!(windows_absolute(q), "\\vms\\b\\q.vhd");
        assert_eq!(
            windows_relative(Path::new("/a/b"), Path::new("/a/b/c/p.vhd")),
            ".\\c\\p.vhd"
        );
    }

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
            (".\\", None),
        ];
        for (stored, want) in cases {
            assert_eq!(local_path(d, stored), want.map(PathBuf::from), "{stored:?}");
        }
    }

    #[test]
    fn round_trips() {
        let (a, q) = (Path::new("/vms/a"), Path::new("/vms/b/q.vhd"));
        for s in [
            windows_absolute(q),
            windows_relative(a, q),
            header_name(a, q),
        ] {
            let mut norm = PathBuf::new();
            for c in local_path(a, &s).unwrap().components() {
                match c {
                    Component::ParentDir => {
                        norm.pop();
                    }
                    c => norm.push(c),
                }
            }
            assert_eq!(norm, q, "{s}");
        }
    }
}
