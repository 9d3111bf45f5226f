//! Parent locators: which stored hints a differencing VHD names its parent
//! by (in the documented order), and reading their data from the file.

use super::*;

impl VhdLayer {
    /// Candidate parent locations in the documented order: W2ru, W2ku,
    /// MacX, Wi2r, Wi2k, then the header's parent name.
    pub(super) fn parent_link(&self, h: &DynamicHeader, tail_off: u64) -> ParentLink {
        let mut hints = Vec::new();
        for code in [PLAT_W2RU, PLAT_W2KU, PLAT_MACX, PLAT_WI2R, PLAT_WI2K] {
            for l in h.locators.iter().filter(|l| l.code == code) {
                let Some(stored) = self.locator_text(l, tail_off) else {
                    continue;
                };
                hints.push(ParentHint {
                    source: code_name(code),
                    stored,
                });
            }
        }
        if !h.parent_name.is_empty() {
            hints.push(ParentHint {
                source: "name".into(),
                stored: h.parent_name.clone(),
            });
        }
        ParentLink {
            // A merge detaches a kept layer by recording the nil id.
            detached: h.parent_id.is_nil(),
            format: None,
            ids: vec![h.parent_id],
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
