//! The write side of a dynamic or differencing VHD: writes into blocks,
//! block allocation, bitmap updates and `flush_locked`, in the order the
//! module docs of `vhd` argue is safe.

use super::*;

impl VhdLayer {
    /// Write `data` (whole sectors) at `in_off` of `block`.
    pub(super) fn write_in_block(&self, block: u64, in_off: u64, data: &[u8]) -> Result<()> {
        let mut entry = self.bat_entry(block)?;
        if entry == UNALLOCATED {
            let _a = self.alloc.lock();
            entry = self.bat_entry(block)?;
            if entry == UNALLOCATED {
                let n = data.len() as u64 / SECTOR;
                return self.allocate_block(block, in_off, data, (in_off / SECTOR, n));
            }
        }
        let start = self.block_start(block, entry)?;
        let off = start + self.bitmap_size + in_off;
        crate::fault::point()?;
        self.file
            .write_all_at(data, off)
            .ctx(&self.path, "cannot write data", Some(off))?;
        self.set_block_bits(block, start, in_off / SECTOR, data.len() as u64 / SECTOR)
    }

    /// Set bitmap bits `first..first+n` of an allocated block (data first,
    /// then the bits that make it visible).
    pub(super) fn set_block_bits(&self, block: u64, start: u64, first: u64, n: u64) -> Result<()> {
        let _a = self.alloc.lock();
        let bm = self.bitmap(block, start)?;
        if bit_run(&bm, first, n) == (true, n) {
            return Ok(());
        }
        let mut nb = bm.to_vec();
        set_bits(&mut nb, first, n);
        let nb: Arc<[u8]> = nb.into();
        // Written by flush(), after the data it makes visible is synced.
        // Queued and cached under the fill lock's write side, so that no
        // reader filling the cache from the file meanwhile can put the old
        // bitmap back over this one.
        let due = {
            let _m = self.meta.write();
            let due = self.pending.set_bitmap(block, start, nb.clone());
            self.cache.insert(self.bitmap_key(block), nb);
            due
        };
        if due {
            self.flush_locked()?;
        }
        Ok(())
    }

    /// Allocate `block` holding `data` at `in_off`; see the module docs for
    /// why this order is safe. Called with `alloc` held.
    pub(super) fn allocate_block(
        &self,
        block: u64,
        in_off: u64,
        data: &[u8],
        bits: (u64, u64),
    ) -> Result<()> {
        let old_footer = self.data_end.load(Ordering::Acquire);
        let data_start =
            (old_footer + FOOTER_SIZE as u64 + self.bitmap_size).next_multiple_of(4096);
        let start = data_start - self.bitmap_size;
        let sector = u32::try_from(start / SECTOR).map_err(|_| {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{}: file would grow past the 2 TiB a VHD BAT can address",
                    self.path.display()
                ),
            )
        })?;
        let mut bm = vec![0u8; self.bitmap_size as usize];
        set_bits(&mut bm, bits.0, bits.1);
        let p = &self.path;
        // The footer first, at the new end: the file grows in one write
        // and ends in a valid footer at every moment after it.
        let new_footer = data_start + self.block_size;
        crate::fault::point()?;
        self.file
            .write_all_at(&self.footer.lock().to_bytes(), new_footer)
            .ctx(p, "cannot write footer", Some(new_footer))?;
        crate::fault::point()?;
        self.file
            .write_all_at(&bm, start)
            .ctx(p, "cannot write sector bitmap", Some(start))?;
        if !data.is_empty() {
            crate::fault::point()?;
            self.file.write_all_at(data, data_start + in_off).ctx(
                p,
                "cannot write data",
                Some(data_start + in_off),
            )?;
        }
        self.data_end.store(new_footer, Ordering::Release);
        self.cache.insert(self.bitmap_key(block), bm.into());
        let due = self.pending.set_entry(block, sector as u64);
        if let Some(n) = self.allocated.lock().as_mut() {
            *n += 1;
        }
        if due {
            self.flush_locked()?;
        }
        Ok(())
    }

    /// Make every write durable: data first, then the BAT entries that
    /// point at new blocks, then everything. Called with `alloc` held.
    pub(super) fn flush_locked(&self) -> Result<()> {
        let p = &self.path;
        if !self.dirty.swap(false, Ordering::AcqRel) && self.pending.is_empty() {
            return Ok(());
        }
        // Only dynamic and differencing layers queue table entries.
        let table = self.header.as_ref().map_or(0, |h| h.table_offset);
        self.pending.write_out(
            &self.file,
            p,
            &self.meta,
            |_| false,
            |block, value| {
                let entry = (value as u32).to_be_bytes();
                let off = table + block * 4;
                self.file
                    .write_all_at(&entry, off)
                    .ctx(p, "cannot write BAT entry", Some(off))?;
                let page = block / BAT_PAGE_ENTRIES;
                if let Some(old) = self.cache.get(&self.bat_key(page)) {
                    let mut np = old.to_vec();
                    let i = ((block % BAT_PAGE_ENTRIES) * 4) as usize;
                    np[i..i + 4].copy_from_slice(&entry);
                    self.cache.insert(self.bat_key(page), np.into());
                }
                Ok(())
            },
        )?;
        crate::fault::point()?;
        self.file.sync_all().ctx(p, "cannot fsync", None)
    }

    pub(super) fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        crate::format::require_writable(self.writable, &self.path)?;
        if offset % SECTOR != 0 || len % SECTOR != 0 || offset + len > self.size {
            return Err(Error::invalid(format!(
                "{}: write of {len} bytes at {offset:#x} is not whole sectors inside the disk",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Make `len` bytes of the file at `off` read as zeros, freeing the
    /// space where the file system can (a hole), else writing zeros.
    pub(super) fn punch(&self, off: u64, len: u64) -> Result<()> {
        crate::fault::point()?;
        let Err(e) = crate::format::fileio::punch_hole(&self.file, off, len) else {
            return Ok(());
        };
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(Error::io(&self.path, "cannot punch a hole", Some(off), e));
        }
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.file
                .write_all_at(&zeros[..n as usize], off + done)
                .ctx(&self.path, "cannot write zeros", Some(off + done))?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader filling the cache holds the fill lock with the bitmap it
    /// read from the file in hand; a writer that queued a newer bitmap
    /// meanwhile used to have it overwritten by that old one, and its next
    /// write then started from the old bits, so the flush lost a sector.
    /// Here the reader's part is played by hand (it cannot be paused inside
    /// the real fill); the writer is the real code.
    #[test]
    fn a_reader_filling_the_cache_cannot_put_an_old_bitmap_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhd");
        create::create_base(&path, 8 << 20, false, 64 << 10).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let opts = LayerOptions {
            writable: true,
            ignore_checksums: false,
            cache: MetaCache::new(1 << 20),
        };
        let l = VhdLayer::open(file, &path, &opts).unwrap();
        l.write_sectors(0, &[1u8; 512]).unwrap();
        l.flush().unwrap();
        let start = l.block_start(0, l.bat_entry(0).unwrap()).unwrap();
        let old = l.load_bitmap(start).unwrap();
        assert_eq!(bit_run(&old, 0, 3), (true, 1));

        crate::format::race_reader_mid_fill(
            &l.meta,
            || l.write_sectors(512, &[2u8; 512]).unwrap(),
            || l.cache.insert(l.bitmap_key(0), old.into()),
        );
        l.flush().unwrap();
        l.write_sectors(1024, &[3u8; 512]).unwrap();
        l.flush().unwrap();
        let bm = l.load_bitmap(start).unwrap();
        assert_eq!(
            bit_run(&bm, 0, 3),
            (true, 3),
            "sectors 0-2 written, bitmap on disk {:#010b}",
            bm[0]
        );
    }
}
