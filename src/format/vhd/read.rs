//! The read side of a dynamic or differencing VHD: BAT entries (cached in
//! 4 KiB pages), block bounds checked against the file, and sector bitmaps
//! (pending ones first, then the cache, then the file).

use super::*;

impl VhdLayer {
    pub(super) fn bat_key(&self, page: u64) -> Key {
        Key::map_page(self.key, page)
    }

    pub(super) fn bitmap_key(&self, block: u64) -> Key {
        Key::detail(self.key, block)
    }

    fn load_bat_page(&self, h: &DynamicHeader, page: u64) -> Result<Vec<u8>> {
        let first = page * BAT_PAGE_ENTRIES;
        let n = (h.max_table_entries as u64 - first).min(BAT_PAGE_ENTRIES);
        let off = h.table_offset + first * 4;
        let mut buf = vec![0u8; (n * 4) as usize];
        self.file
            .read_exact_at(&mut buf, off)
            .ctx(&self.path, "cannot read BAT", Some(off))?;
        Ok(buf)
    }

    /// The BAT entry of `block` (a sector number or `UNALLOCATED`).
    pub fn bat_entry(&self, block: u64) -> Result<u32> {
        let h = self.header.as_ref().expect("dynamic layer");
        if block >= h.max_table_entries as u64 {
            return Ok(UNALLOCATED);
        }
        if let Some(e) = self.pending.entry(block) {
            return Ok(e as u32);
        }
        let page = block / BAT_PAGE_ENTRIES;
        let buf = self.cache.get_or_load(self.bat_key(page), &self.meta, || {
            self.load_bat_page(h, page)
        })?;
        let i = ((block % BAT_PAGE_ENTRIES) * 4) as usize;
        Ok(u32::from_be_bytes(buf[i..i + 4].try_into().unwrap()))
    }

    /// File offset of an allocated block's bitmap, validated against the file.
    pub(super) fn block_start(&self, block: u64, entry: u32) -> Result<u64> {
        let start = entry as u64 * SECTOR;
        let end = start + self.bitmap_size + self.block_size;
        let h = self.header.as_ref().expect("dynamic layer");
        // Never hand out metadata as disk data: the header and BAT as
        // opened are off limits (overlaps between blocks are for `check`).
        let bat_end = h.table_offset + h.max_table_entries as u64 * 4;
        let over_bat = start < bat_end && h.table_offset < end;
        let over_header = start < self.header_at + HEADER_SIZE as u64 && self.header_at < end;
        if over_bat || over_header {
            return Err(Error::corrupt(
                &self.path,
                h.table_offset + block * 4,
                format!(
                    "BAT entry {block} points to {start:#x}..{end:#x}, over the {}",
                    if over_bat { "BAT" } else { "dynamic header" }
                ),
            ));
        }
        if start < FOOTER_SIZE as u64 || end > self.data_end.load(Ordering::Acquire) {
            return Err(Error::corrupt(
                &self.path,
                h.table_offset + block * 4,
                format!(
                    "BAT entry {block} points to sector {entry:#x} (bytes {start:#x}..{end:#x}), outside the data area of the file"
                ),
            ));
        }
        Ok(start)
    }

    pub(super) fn load_bitmap(&self, start: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.bitmap_size as usize];
        self.file.read_exact_at(&mut buf, start).ctx(
            &self.path,
            "cannot read sector bitmap",
            Some(start),
        )?;
        Ok(buf)
    }

    pub(super) fn bitmap(&self, block: u64, start: u64) -> Result<Arc<[u8]>> {
        if let Some(b) = self.pending.bitmap(block) {
            return Ok(b);
        }
        // Under the fill lock, look in `pending` again: a writer may have
        // queued a newer bitmap since (and the cache may have evicted it
        // already), and the file does not have it yet.
        self.cache
            .get_or_load(self.bitmap_key(block), &self.meta, || {
                match self.pending.bitmap(block) {
                    Some(b) => Ok(b.to_vec()),
                    None => self.load_bitmap(start),
                }
            })
    }
}
