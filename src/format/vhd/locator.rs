//! Parent locators: which stored hints a differencing VHD names its parent
//! by (in the documented order), and reading their data from the file.

use super::*;

impl VhdLayer {
    /// Candidate parent locations in the documented order: W2ru, W2ku,
    /// MacX, Wi2r, Wi2k, then the header's parent name.
    pub(super) fn parent_link(&self, h: &DynamicHeader, tail_off: u64) -> ParentLink {
        let dir = crate::paths::folder_of(&self.path);
        let mut hints = Vec::new();
        for code in [PLAT_W2RU, PLAT_W2KU, PLAT_MACX, PLAT_WI2R, PLAT_WI2K] {
            for l in h.locators.iter().filter(|l| l.code == code) {
                let Some(stored) = self.locator_text(l, tail_off) else {
                    continue;
                };
                let path = match code {
                    PLAT_MACX => file_url_path(&stored),
                    _ => hint::local_path(dir, &stored),
                };
                hints.push(ParentHint {
                    source: code_name(code),
                    stored,
                    path,
                });
            }
        }
        if !h.parent_name.is_empty() {
            hints.push(ParentHint {
                source: "name".into(),
                stored: h.parent_name.clone(),
                path: hint::local_path(dir, &h.parent_name),
            });
        }
        ParentLink {
            id: h.parent_id,
            alt_id: None,
            hints,
        }
    }

    fn locator_text(&self, l: &Locator, tail_off: u64) -> Option<String> {
        if l.data_len == 0 || l.data_len > MAX_LOCATOR_LEN {
            return None;
        }
        let end = l.data_offset.checked_add(l.data_len as u64)?;
        if end > tail_off {
            log::warn!(
                "{}: {} locator data at {:#x}+{} lies past the footer; ignored",
                self.path.display(),
                code_name(l.code),
                l.data_offset,
                l.data_len
            );
            return None;
        }
        let mut data = vec![0u8; l.data_len as usize];
        self.file.read_exact_at(&mut data, l.data_offset).ok()?;
        decode_locator(l.code, &data)
    }
}

/// `file://host/dir/x.vhd` to `/dir/x.vhd`, percent-decoded.
fn file_url_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("file://")?;
    let path = &rest[rest.find('/')?..];
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?, 16) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls() {
        assert_eq!(
            file_url_path("file://localhost/a%20b/p.vhd"),
            Some(PathBuf::from("/a b/p.vhd"))
        );
        assert_eq!(
            file_url_path("file:///x.vhd"),
            Some(PathBuf::from("/x.vhd"))
        );
        assert_eq!(file_url_path("http://x"), None);
    }
}
