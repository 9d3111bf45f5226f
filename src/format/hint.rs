//! Parent path hints as VHD and VHDX write them: what a child stores in the
//! fields that name its parent's location. Shared by both drivers so they
//! agree. Reading a stored value back into a local path is not a driver's
//! business: `crate::paths::hint_path` does it for every format.
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

use std::path::{Component, Path};

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
    fn round_trips() {
        let (a, q) = (Path::new("/vms/a"), Path::new("/vms/b/q.vhd"));
        for s in [
            windows_absolute(q),
            windows_relative(a, q),
            header_name(a, q),
        ] {
            let mut norm = std::path::PathBuf::new();
            for c in crate::paths::hint_path(a, &s).unwrap().components() {
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
