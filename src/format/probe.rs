//! What a file is when no driver claims it: the error a user sees for a
//! qcow2, a VMDK or a LUKS volume should name what it found and what to do,
//! not only which cookie was missing.
//!
//! [`identify`] is a pure function over the first bytes of the file (at
//! least [`HEAD_LEN`] of them when the file is that long) and its length, so
//! it is unit-tested from hand-built bytes. It runs only on the error path
//! of `open_layer`, after the VHD and VHDX probes said no. Container formats
//! come first (their headers are unambiguous magics at offset 0); then file
//! systems, whose boot sectors also carry the MBR's 0x55AA; then partition
//! tables.

use std::fmt;

/// How many leading bytes [`identify`] looks at: up to btrfs's superblock
/// magic at 64 KiB + 64.
pub const HEAD_LEN: usize = (64 << 10) + 4096;

/// A format chainfs recognises but does not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Foreign {
    /// An empty file.
    Empty,
    Qcow {
        version: u32,
    },
    /// A VMDK sparse extent (`KDMV`), with its version.
    VmdkSparse {
        version: u32,
    },
    /// A VMDK ESX sparse extent (`COWD`).
    VmdkCowd,
    /// A VMDK text descriptor (the extents are other files).
    VmdkDescriptor,
    Vdi,
    Luks {
        version: u16,
    },
    /// A VHD whose two footers are both unreadable, recognised by its
    /// dynamic disk header (`cxsparse`) at offset 512.
    DamagedVhd,
    /// A raw disk or file-system image; the text says what was found.
    Raw(&'static str),
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Foreign::Empty => f.write_str("an empty file, not a disk image"),
            Foreign::Qcow {
                version: v @ (2 | 3),
            } => write!(f, "a qcow2 image (version {v})"),
            Foreign::Qcow { version } => write!(f, "a qcow image (version {version})"),
            Foreign::VmdkSparse { version } => {
                write!(f, "a VMDK sparse extent (version {version})")
            }
            Foreign::VmdkCowd => f.write_str("a VMDK ESX sparse extent (COWD)"),
            Foreign::VmdkDescriptor => f.write_str("a VMDK descriptor"),
            Foreign::Vdi => f.write_str("a VirtualBox VDI image"),
            Foreign::Luks { version } => write!(f, "a LUKS{version} encrypted volume"),
            Foreign::DamagedVhd => f.write_str(
                "a dynamic VHD (its header `cxsparse` is at offset 0x200) whose footers at \
                 offset 0 and at the end both lack the cookie `conectix`",
            ),
            Foreign::Raw(what) => write!(f, "looks like a raw disk ({what})"),
        }
    }
}

impl Foreign {
    /// What chainfs does with it, and what the user can do instead.
    pub fn advice(&self) -> &'static str {
        match self {
            Foreign::Empty => "chainfs reads VHD, VHDX, qcow2 and raw images",
            Foreign::Qcow { .. } => {
                "chainfs reads VHD, VHDX, qcow2 (versions 2 and 3) and raw images; convert it with \
                 `qemu-img convert -O vhdx`"
            }
            Foreign::VmdkSparse { .. } | Foreign::VmdkCowd | Foreign::VmdkDescriptor => {
                "chainfs reads VHD, VHDX, qcow2 and raw images; convert it with `qemu-img convert -O vhdx`"
            }
            Foreign::Vdi => {
                "chainfs reads VHD, VHDX, qcow2 and raw images; convert it with `qemu-img convert -O vhdx` \
                 or `VBoxManage clonemedium --format VHD`"
            }
            Foreign::Luks { .. } => {
                "chainfs reads VHD, VHDX, qcow2 and raw images; open it with `cryptsetup open` (a LUKS \
                 volume inside a VHD/VHDX is read through `chainfs mount`)"
            }
            Foreign::DamagedVhd => {
                "the footer cannot be recovered by chainfs; restore the file from a copy"
            }
            Foreign::Raw(_) => "chainfs reads it as a raw image",
        }
    }
}

/// The first [`HEAD_LEN`] bytes of `file` (fewer when it is shorter) and
/// its length.
pub fn head(file: &std::fs::File, path: &std::path::Path) -> crate::Result<(Vec<u8>, u64)> {
    use crate::error::IoContext;
    use std::os::unix::fs::FileExt;
    let len = file.metadata().ctx(path, "cannot stat", None)?.len();
    let mut head = vec![0u8; HEAD_LEN.min(usize::try_from(len).unwrap_or(usize::MAX))];
    file.read_exact_at(&mut head, 0)
        .ctx(path, "cannot read", Some(0))?;
    Ok((head, len))
}

/// Recognise `head` (the first bytes of a file of `len` bytes) as a format
/// chainfs does not read; `None` when nothing is recognised.
pub fn identify(head: &[u8], len: u64) -> Option<Foreign> {
    if len == 0 {
        return Some(Foreign::Empty);
    }
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let be32 = |off: usize| {
        head.get(off..off + 4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    };
    let le32 = |off: usize| {
        head.get(off..off + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let le16 = |off: usize| {
        head.get(off..off + 2)
            .map(|b| u16::from_le_bytes(b.try_into().unwrap()))
    };

    // Image containers: a magic at offset 0.
    if at(0, b"QFI\xfb") {
        return Some(Foreign::Qcow {
            version: be32(4).unwrap_or(0),
        });
    }
    if at(0, b"KDMV") {
        return Some(Foreign::VmdkSparse {
            version: le32(4).unwrap_or(0),
        });
    }
    if at(0, b"COWD") {
        return Some(Foreign::VmdkCowd);
    }
    if at(0, b"# Disk DescriptorFile") {
        return Some(Foreign::VmdkDescriptor);
    }
    if at(0, b"<<< Oracle VM VirtualBox Disk Image >>>")
        || at(0, b"<<< Sun VirtualBox Disk Image >>>")
        || le32(0x40) == Some(0xbeda_107f)
    {
        return Some(Foreign::Vdi);
    }
    if at(0, b"LUKS\xba\xbe") {
        return Some(Foreign::Luks {
            version: head
                .get(6..8)
                .map_or(0, |b| u16::from_be_bytes([b[0], b[1]])),
        });
    }
    if at(512, b"cxsparse") {
        return Some(Foreign::DamagedVhd);
    }

    // File systems at offset 0 (a partition image, or a disk formatted
    // without a partition table). Their boot sectors may end in 0x55AA too,
    // so they come before the MBR.
    const EXT_SB: usize = 1024;
    if le16(EXT_SB + 0x38) == Some(0xef53) {
        let compat = le32(EXT_SB + 0x5c).unwrap_or(0);
        let incompat = le32(EXT_SB + 0x60).unwrap_or(0);
        // extents, 64bit, flex_bg: ext4; a journal without them: ext3.
        let fs = if incompat & (0x40 | 0x80 | 0x200) != 0 {
            "an ext4 file system"
        } else if compat & 0x4 != 0 {
            "an ext3 file system"
        } else {
            "an ext2 file system"
        };
        return Some(Foreign::Raw(fs));
    }
    if at(0, b"XFSB") {
        return Some(Foreign::Raw("an XFS file system"));
    }
    if at(3, b"NTFS    ") {
        return Some(Foreign::Raw("an NTFS file system"));
    }
    if at(3, b"EXFAT   ") {
        return Some(Foreign::Raw("an exFAT file system"));
    }
    if at(0x52, b"FAT32   ") || at(0x36, b"FAT12   ") || at(0x36, b"FAT16   ") {
        return Some(Foreign::Raw("a FAT file system"));
    }
    if at((64 << 10) + 64, b"_BHRfS_M") {
        return Some(Foreign::Raw("a btrfs file system"));
    }
    if at(32769, b"CD001") {
        return Some(Foreign::Raw("an ISO 9660 file system"));
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        return Some(Foreign::Raw("a Linux swap area"));
    }
    if at(512, b"LABELONE") && at(536, b"LVM2 001") {
        return Some(Foreign::Raw("an LVM physical volume"));
    }

    // Partition tables: GPT behind its protective MBR, then a plain MBR.
    if at(512, b"EFI PART") {
        return Some(Foreign::Raw("GPT partition table"));
    }
    if at(510, b"\x55\xaa") {
        return Some(Foreign::Raw("MBR partition table"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(patches: &[(usize, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; HEAD_LEN];
        for (off, bytes) in patches {
            b[*off..off + bytes.len()].copy_from_slice(bytes);
        }
        b
    }

    fn id(patches: &[(usize, &[u8])]) -> Option<Foreign> {
        identify(&head(patches), 1 << 30)
    }

    #[test]
    fn containers() {
        assert_eq!(
            id(&[(0, b"QFI\xfb\0\0\0\x03")]),
            Some(Foreign::Qcow { version: 3 })
        );
        assert_eq!(
            id(&[(0, b"QFI\xfb\0\0\0\x01")]).unwrap().to_string(),
            "a qcow image (version 1)"
        );
        assert_eq!(
            id(&[(0, b"KDMV\x01\0\0\0")]),
            Some(Foreign::VmdkSparse { version: 1 })
        );
        assert_eq!(id(&[(0, b"COWD")]), Some(Foreign::VmdkCowd));
        assert_eq!(
            id(&[(0, b"# Disk DescriptorFile\nversion=1\n")]),
            Some(Foreign::VmdkDescriptor)
        );
        assert_eq!(
            id(&[(0, b"<<< Oracle VM VirtualBox Disk Image >>>\n")]),
            Some(Foreign::Vdi)
        );
        assert_eq!(
            id(&[(0x40, &0xbeda_107fu32.to_le_bytes())]),
            Some(Foreign::Vdi)
        );
        assert_eq!(
            id(&[(0, b"LUKS\xba\xbe\0\x02")]),
            Some(Foreign::Luks { version: 2 })
        );
        assert_eq!(id(&[(512, b"cxsparse")]), Some(Foreign::DamagedVhd));
    }

    #[test]
    fn file_systems_before_the_boot_signature() {
        let ext = |compat: u32, incompat: u32| {
            id(&[
                (1024 + 0x38, &[0x53, 0xef]),
                (1024 + 0x5c, &compat.to_le_bytes()),
                (1024 + 0x60, &incompat.to_le_bytes()),
            ])
        };
        assert_eq!(ext(0, 0x2), Some(Foreign::Raw("an ext2 file system")));
        assert_eq!(ext(0x4, 0x2), Some(Foreign::Raw("an ext3 file system")));
        assert_eq!(ext(0x4, 0x2c2), Some(Foreign::Raw("an ext4 file system")));
        assert_eq!(
            id(&[(3, b"NTFS    "), (510, b"\x55\xaa")]),
            Some(Foreign::Raw("an NTFS file system"))
        );
        assert_eq!(
            id(&[(0x52, b"FAT32   "), (510, b"\x55\xaa")]),
            Some(Foreign::Raw("a FAT file system"))
        );
        assert_eq!(
            id(&[(0x36, b"FAT16   "), (510, b"\x55\xaa")]),
            Some(Foreign::Raw("a FAT file system"))
        );
        assert_eq!(
            id(&[(0, b"XFSB")]),
            Some(Foreign::Raw("an XFS file system"))
        );
        assert_eq!(
            id(&[((64 << 10) + 64, b"_BHRfS_M")]),
            Some(Foreign::Raw("a btrfs file system"))
        );
        assert_eq!(
            id(&[(32769, b"CD001")]),
            Some(Foreign::Raw("an ISO 9660 file system"))
        );
        assert_eq!(
            id(&[(4086, b"SWAPSPACE2")]),
            Some(Foreign::Raw("a Linux swap area"))
        );
        assert_eq!(
            id(&[(512, b"LABELONE"), (536, b"LVM2 001")]),
            Some(Foreign::Raw("an LVM physical volume"))
        );
    }

    #[test]
    fn partition_tables() {
        assert_eq!(
            id(&[(510, b"\x55\xaa"), (512, b"EFI PART")]),
            Some(Foreign::Raw("GPT partition table"))
        );
        assert_eq!(
            id(&[(510, b"\x55\xaa")]).unwrap().to_string(),
            "looks like a raw disk (MBR partition table)"
        );
    }

    #[test]
    fn nothing_known_and_short_heads() {
        assert_eq!(id(&[]), None);
        assert_eq!(identify(b"hello", 5), None);
        assert_eq!(identify(&[], 0), Some(Foreign::Empty));
        // A head cut short of an offset never panics or matches.
        assert_eq!(identify(&head(&[(510, b"\x55\xaa")])[..511], 511), None);
        assert_eq!(identify(b"QFI", 3), None);
    }
}
