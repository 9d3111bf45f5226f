//! Unit tests of the qcow2 structures, from hand-built bytes (never from
//! our own `to_bytes`, so a symmetric mistake cannot hide).

use super::*;

fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}

/// A valid v3 header (112 bytes, 64 KiB clusters, 1 GiB) in a 64 KiB
/// cluster, with the end marker after it.
fn v3() -> Vec<u8> {
    let mut b = vec![0u8; 65536];
    b[0..4].copy_from_slice(b"QFI\xfb");
    put32(&mut b, 4, 3);
    put32(&mut b, 20, 16);
    put64(&mut b, 24, 1 << 30);
    put32(&mut b, 36, 2);
    put64(&mut b, 40, 0x30000);
    put64(&mut b, 48, 0x10000);
    put32(&mut b, 56, 1);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, 112);
    b
}

fn v2() -> Vec<u8> {
    let mut b = v3();
    put32(&mut b, 4, 2);
    b[72..112].fill(0);
    b
}

fn err(b: &[u8]) -> Error {
    Header::parse(b).expect_err("must be refused")
}

/// The error has the kind, and its message names the offset and the field.
fn assert_err(b: &[u8], kind: ErrorKind, offset: u64, field: &str) {
    let e = err(b);
    assert_eq!(e.kind, kind, "{}", e.message());
    let m = e.message();
    assert!(m.contains(&format!("offset {offset:#x}")), "{m}");
    assert!(m.contains(field), "{m}");
}

#[test]
fn v3_header_every_field() {
    let mut b = v3();
    put64(&mut b, 8, 0x200);
    put32(&mut b, 16, 9);
    b[0x200..0x209].copy_from_slice(b"base.qcow");
    put32(&mut b, 32, 0);
    put32(&mut b, 36, 3);
    put32(&mut b, 56, 2);
    put32(&mut b, 60, 1);
    put64(&mut b, 64, 0x50000);
    put64(&mut b, 72, INCOMPAT_DIRTY);
    put64(&mut b, 80, COMPAT_LAZY_REFCOUNTS | 0x80);
    put32(&mut b, 96, 5);
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.backing_file_offset, 0x200);
    assert_eq!(h.backing_file_size, 9);
    assert_eq!(h.backing_file.as_deref(), Some(&b"base.qcow"[..]));
    assert_eq!(h.cluster_bits, 16);
    assert_eq!(h.cluster_size(), 65536);
    assert_eq!(h.size, 1 << 30);
    assert_eq!(h.crypt_method, 0);
    assert_eq!(h.l1_size, 3);
    assert_eq!(h.l1_table_offset, 0x30000);
    assert_eq!(h.refcount_table_offset, 0x10000);
    assert_eq!(h.refcount_table_clusters, 2);
    assert_eq!(h.nb_snapshots, 1);
    assert_eq!(h.snapshots_offset, 0x50000);
    assert_eq!(h.incompatible_features, INCOMPAT_DIRTY);
    assert!(h.is_dirty() && !h.is_corrupt());
    assert!(h.lazy_refcounts());
    assert_eq!(h.compatible_features, 0x81);
    assert_eq!(h.autoclear_features, 0);
    assert_eq!(h.refcount_order, 5);
    assert_eq!(h.layout().refcount_bits(), 32);
    assert_eq!(h.header_length, 112);
    assert_eq!(h.compression_type, 0);
    assert_eq!(h.compression(), Compression::Zlib);
    assert_eq!(h.tail, vec![0; 7]);
    assert!(h.extensions.is_empty());
    // The bytes we built are what a writer writes back.
    let out = h.to_bytes().unwrap();
    assert_eq!(out[..], b[..out.len()]);
}

#[test]
fn v2_header_implies_order_4_and_length_72() {
    let mut b = v2();
    // Bytes 72.. are not header fields in v2: whatever is there is ignored
    // (here: an end marker at 72 = zeros).
    put64(&mut b, 80, 0xdead);
    put32(&mut b, 72, 0);
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.version, 2);
    assert_eq!(h.header_length, 72);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(
        h.incompatible_features | h.compatible_features | h.autoclear_features,
        0
    );
    assert_eq!(h.to_bytes().unwrap().len(), 80, "72 + end marker");
}

#[test]
fn v2_old_style_backing_name_right_after_header() {
    let mut b = v2();
    put64(&mut b, 8, 72);
    put32(&mut b, 16, 4);
    b[72..76].copy_from_slice(b"base");
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.backing_file.as_deref(), Some(&b"base"[..]));
    assert!(h.extensions.is_empty());
    assert_eq!(h.to_bytes().unwrap(), b[..76].to_vec());
}

#[test]
fn compression_type_byte() {
    let mut b = v3();
    put64(&mut b, 72, INCOMPAT_COMPRESSION);
    b[104] = 1;
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.compression(), Compression::Zstd);
    assert_eq!(h.compression_type, 1);
    assert_eq!(h.to_bytes().unwrap()[104], 1);
    // Bit set but byte 0, or byte without the bit, or an unknown type.
    b[104] = 0;
    assert_err(&b, ErrorKind::Corrupt, 0x68, "compression_type");
    b[104] = 2;
    assert_err(&b, ErrorKind::Unsupported, 0x68, "compression_type");
    put64(&mut b, 72, 0);
    b[104] = 1;
    assert_err(&b, ErrorKind::Corrupt, 0x68, "compression_type");
    // A 104-byte header has no compression_type field.
    let mut b = v3();
    put32(&mut b, 100, 104);
    put64(&mut b, 72, INCOMPAT_COMPRESSION);
    b[104] = 1;
    assert_err(&b, ErrorKind::Corrupt, 0x64, "header_length");
}

#[test]
fn unknown_header_tail_is_kept() {
    let mut b = v3();
    put32(&mut b, 100, 120);
    b[110] = 0x5a;
    b[119] = 0xa5;
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.tail.len(), 15);
    assert_eq!(h.tail[5], 0x5a);
    assert_eq!(h.to_bytes().unwrap()[..120], b[..120]);
}

#[test]
fn bad_fields_name_offset_and_field() {
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(Edit, ErrorKind, u64, &str)> = vec![
        (Box::new(|b| b[3] = 0), ErrorKind::Corrupt, 0, "magic"),
        (
            Box::new(|b| put32(b, 4, 4)),
            ErrorKind::Unsupported,
            4,
            "version",
        ),
        (
            Box::new(|b| put32(b, 4, 1)),
            ErrorKind::Unsupported,
            4,
            "version",
        ),
        (
            Box::new(|b| put32(b, 20, 8)),
            ErrorKind::Corrupt,
            0x14,
            "cluster_bits",
        ),
        (
            Box::new(|b| put32(b, 20, 22)),
            ErrorKind::Unsupported,
            0x14,
            "cluster_bits",
        ),
        (
            Box::new(|b| put32(b, 32, 3)),
            ErrorKind::Corrupt,
            0x20,
            "crypt_method",
        ),
        (
            Box::new(|b| put32(b, 36, 1)),
            ErrorKind::Corrupt,
            0x24,
            "l1_size",
        ),
        (
            Box::new(|b| put32(b, 36, 5 << 20)),
            ErrorKind::Unsupported,
            0x24,
            "l1_size",
        ),
        (
            Box::new(|b| put64(b, 24, u64::MAX)),
            ErrorKind::Corrupt,
            0x18,
            "size",
        ),
        (
            Box::new(|b| put64(b, 40, 0x30200)),
            ErrorKind::Corrupt,
            0x28,
            "l1_table_offset",
        ),
        (
            Box::new(|b| put64(b, 40, 0)),
            ErrorKind::Corrupt,
            0x28,
            "l1_table_offset",
        ),
        (
            Box::new(|b| put64(b, 48, 0x10008)),
            ErrorKind::Corrupt,
            0x30,
            "refcount_table_offset",
        ),
        (
            Box::new(|b| put64(b, 48, 0)),
            ErrorKind::Corrupt,
            0x30,
            "refcount_table_offset",
        ),
        (
            Box::new(|b| put32(b, 56, 0)),
            ErrorKind::Corrupt,
            0x38,
            "refcount_table_clusters",
        ),
        (
            Box::new(|b| put32(b, 56, 129)),
            ErrorKind::Unsupported,
            0x38,
            "refcount_table_clusters",
        ),
        (
            Box::new(|b| put32(b, 60, 65537)),
            ErrorKind::Corrupt,
            0x3c,
            "nb_snapshots",
        ),
        (
            Box::new(|b| put32(b, 60, 1)),
            ErrorKind::Corrupt,
            0x40,
            "snapshots_offset",
        ),
        (
            Box::new(|b| put64(b, 64, 0x100)),
            ErrorKind::Corrupt,
            0x40,
            "snapshots_offset",
        ),
        (
            Box::new(|b| put32(b, 96, 7)),
            ErrorKind::Corrupt,
            0x60,
            "refcount_order",
        ),
        (
            Box::new(|b| put32(b, 100, 100)),
            ErrorKind::Corrupt,
            0x64,
            "header_length",
        ),
        (
            Box::new(|b| put32(b, 100, 108)),
            ErrorKind::Corrupt,
            0x64,
            "header_length",
        ),
        (
            Box::new(|b| put32(b, 100, 0x20000)),
            ErrorKind::Corrupt,
            0x64,
            "header_length",
        ),
        (
            Box::new(|b| {
                put64(b, 72, INCOMPAT_EXTENDED_L2);
                put32(b, 20, 13);
                put32(b, 36, 1 << 14);
            }),
            ErrorKind::Corrupt,
            0x14,
            "cluster_bits",
        ),
        (
            Box::new(|b| put64(b, 88, AUTOCLEAR_DATA_FILE_RAW)),
            ErrorKind::Corrupt,
            0x58,
            "autoclear",
        ),
        (
            Box::new(|b| put64(b, 88, AUTOCLEAR_BITMAPS)),
            ErrorKind::Corrupt,
            0x58,
            "autoclear",
        ),
        (
            Box::new(|b| put32(b, 32, CRYPT_LUKS)),
            ErrorKind::Corrupt,
            0x20,
            "crypt_method",
        ),
        (
            Box::new(|b| {
                put64(b, 8, 0x100);
                put32(b, 16, 1024);
            }),
            ErrorKind::Corrupt,
            0x10,
            "backing_file_size",
        ),
        (
            Box::new(|b| {
                put64(b, 8, 0xfffc);
                put32(b, 16, 8);
            }),
            ErrorKind::Corrupt,
            0x8,
            "backing_file_offset",
        ),
        (
            Box::new(|b| {
                put64(b, 8, 0x40);
                put32(b, 16, 8);
            }),
            ErrorKind::Corrupt,
            0x8,
            "backing_file_offset",
        ),
    ];
    for (i, (edit, kind, offset, field)) in cases.iter().enumerate() {
        let mut b = v3();
        edit(&mut b);
        let e = err(&b);
        assert_eq!(e.kind, *kind, "case {i}: {}", e.message());
        assert!(
            e.message().contains(&format!("offset {offset:#x}")),
            "case {i}: {}",
            e.message()
        );
        assert!(e.message().contains(field), "case {i}: {}", e.message());
    }
    assert_err(&v3()[..71], ErrorKind::Corrupt, 0, "header");
    assert_err(&v3()[..100], ErrorKind::Corrupt, 0, "header");
}

#[test]
fn l1_size_must_cover_the_virtual_size() {
    // 64 KiB clusters: one L2 table maps 8192 * 64 KiB = 512 MiB; 1 GiB + 1
    // byte needs 3 entries.
    let mut b = v3();
    put64(&mut b, 24, (1 << 30) + 1);
    assert_err(&b, ErrorKind::Corrupt, 0x24, "l1_size");
    put32(&mut b, 36, 3);
    Header::parse(&b).unwrap();
    // Extended L2 halves the coverage (4096 entries of 16 bytes).
    put64(&mut b, 72, INCOMPAT_EXTENDED_L2);
    put64(&mut b, 24, 1 << 30);
    put32(&mut b, 36, 3);
    assert_err(&b, ErrorKind::Corrupt, 0x24, "l1_size");
    put32(&mut b, 36, 4);
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.layout().l2_entries(), 4096);
    assert_eq!(h.layout().subcluster_size(), 2048);
}

/// Append one extension (type, length, data, zero padding) at `at`;
/// returns the offset after it.
fn put_ext(b: &mut [u8], at: usize, kind: u32, data: &[u8]) -> usize {
    put32(b, at, kind);
    put32(b, at + 4, data.len() as u32);
    b[at + 8..at + 8 + data.len()].copy_from_slice(data);
    at + 8 + data.len().div_ceil(8) * 8
}

#[test]
fn every_extension_type_parses_and_writes_back() {
    let mut b = v3();
    put64(&mut b, 72, INCOMPAT_DATA_FILE | (1 << 9));
    put64(&mut b, 88, AUTOCLEAR_BITMAPS);
    let mut at = 112;
    at = put_ext(&mut b, at, EXT_BACKING_FORMAT, b"qcow2");
    let mut names = vec![0u8; 96];
    names[0] = 0;
    names[1] = 9;
    names[2..9].copy_from_slice(b"frobbed");
    names[48] = 2;
    names[49] = 0;
    names[50..96].fill(b'x'); // full length, no NUL
    at = put_ext(&mut b, at, EXT_FEATURE_NAMES, &names);
    let mut bm = [0u8; 24];
    put32(&mut bm, 0, 2);
    put64(&mut bm, 8, 80);
    put64(&mut bm, 16, 0x70000);
    at = put_ext(&mut b, at, EXT_BITMAPS, &bm);
    at = put_ext(&mut b, at, EXT_DATA_FILE, b"disk.data");
    at = put_ext(&mut b, at, 0x1234_5678, &[1, 2, 3]);
    let end = at + 8; // end marker: zeros already
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.backing_format(), Some(&b"qcow2"[..]));
    assert_eq!(h.data_file(), Some(&b"disk.data"[..]));
    assert_eq!(h.bitmaps(), Some((2, 80, 0x70000)));
    assert_eq!(h.feature_names().len(), 2);
    assert_eq!(h.feature_name(0, 9).as_deref(), Some("frobbed"));
    assert_eq!(h.feature_name(2, 0).unwrap().len(), 46);
    assert_eq!(
        h.extensions.last(),
        Some(&Extension::Unknown {
            kind: 0x1234_5678,
            data: vec![1, 2, 3]
        })
    );
    assert_eq!(h.to_bytes().unwrap(), b[..end].to_vec());
    // Unknown incompatible bit 9 is refused, by the name the image gives it.
    let e = h.check_supported(false).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(
        e.message().contains("bit 9 (\"frobbed\")"),
        "{}",
        e.message()
    );
}

#[test]
fn encryption_extension_and_refusal() {
    let mut b = v3();
    put32(&mut b, 32, CRYPT_LUKS);
    let mut d = [0u8; 16];
    put64(&mut d, 0, 0x20000);
    put64(&mut d, 8, 2068480);
    put_ext(&mut b, 112, EXT_ENCRYPTION, &d);
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.encryption(), Some((0x20000, 2068480)));
    let e = h.check_supported(false).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(e.message().contains("LUKS"), "{}", e.message());
    put32(&mut b, 32, CRYPT_AES);
    b[112..140].fill(0);
    let e = Header::parse(&b)
        .unwrap()
        .check_supported(false)
        .unwrap_err();
    assert!(e.message().contains("AES"), "{}", e.message());
    // Misaligned LUKS header offset.
    put32(&mut b, 32, CRYPT_LUKS);
    put64(&mut d, 0, 0x20001);
    put_ext(&mut b, 112, EXT_ENCRYPTION, &d);
    assert_err(&b, ErrorKind::Corrupt, 120, "encryption");
}

#[test]
fn supported_features_and_corrupt_bit() {
    let mut b = v3();
    put64(&mut b, 72, INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
    let h = Header::parse(&b).unwrap();
    h.check_supported(false).unwrap();
    let e = h.check_supported(true).unwrap_err();
    assert!(e.message().contains("corrupt"), "{}", e.message());
    put64(&mut b, 72, 1 << 40);
    let e = Header::parse(&b)
        .unwrap()
        .check_supported(false)
        .unwrap_err();
    assert!(e.message().contains("bit 40"), "{}", e.message());
    assert!(e.message().contains("offset 0x48"), "{}", e.message());
}

#[test]
fn bad_extensions() {
    // Length past the first cluster.
    let mut b = v3();
    put32(&mut b, 112, EXT_BACKING_FORMAT);
    put32(&mut b, 116, 0x10000);
    assert_err(&b, ErrorKind::Corrupt, 116, "extension");
    // Past the backing file name, which ends the extension area.
    let mut b = v3();
    put64(&mut b, 8, 0x100);
    put32(&mut b, 16, 4);
    put_ext(&mut b, 112, EXT_BACKING_FORMAT, &[b'q'; 140]);
    assert_err(&b, ErrorKind::Corrupt, 116, "extension");
    // Twice the same known type.
    let mut b = v3();
    let at = put_ext(&mut b, 112, EXT_BACKING_FORMAT, b"raw");
    put_ext(&mut b, at, EXT_BACKING_FORMAT, b"raw");
    assert_err(&b, ErrorKind::Corrupt, at as u64, "twice");
    // Wrong fixed lengths.
    let mut b = v3();
    put64(&mut b, 88, AUTOCLEAR_BITMAPS);
    put_ext(&mut b, 112, EXT_BITMAPS, &[0; 16]);
    assert_err(&b, ErrorKind::Corrupt, 120, "bitmaps");
    // ...unless the bitmaps are marked inconsistent (autoclear bit clear):
    // then qemu ignores them, and we keep them raw.
    put64(&mut b, 88, 0);
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.bitmaps(), None);
    assert_eq!(
        h.extensions,
        [Extension::Unknown {
            kind: EXT_BITMAPS,
            data: vec![0; 16]
        }]
    );
    assert_eq!(h.to_bytes().unwrap(), b[..112 + 8 + 16 + 8].to_vec());
    // A feature name table of odd length is kept raw, not refused.
    let mut b = v3();
    put_ext(&mut b, 112, EXT_FEATURE_NAMES, &[1; 50]);
    let h = Header::parse(&b).unwrap();
    assert!(h.feature_names().is_empty());
    assert_eq!(h.extensions[0].data(), vec![1; 50]);
    // A file that ends inside the extension area reads as an end marker.
    let b = v3();
    let h = Header::parse(&b[..116]).unwrap();
    assert!(h.extensions.is_empty());
}

fn layout(cluster_bits: u32, extended_l2: bool, external_data: bool) -> Layout {
    Layout {
        cluster_bits,
        extended_l2,
        external_data,
        refcount_order: 4,
    }
}

#[test]
fn l1_entries() {
    let l = layout(16, false, false);
    assert_eq!(
        L1Entry::decode(0x8000_0000_0005_0000, 0, &l).unwrap(),
        L1Entry {
            l2_offset: 0x50000,
            copied: true
        }
    );
    assert_eq!(L1Entry::decode(0, 0, &l).unwrap().l2_offset, 0);
    // Reserved bits are ignored, as qemu does.
    assert_eq!(
        L1Entry::decode(0x0100_0000_0005_0001, 0, &l)
            .unwrap()
            .l2_offset,
        0x50000
    );
    let e = L1Entry::decode(0x5200, 0x30008, &l).unwrap_err();
    assert!(
        e.message().contains("offset 0x30008") && e.message().contains("L1"),
        "{}",
        e.message()
    );
    let x = L1Entry {
        l2_offset: 0x70000,
        copied: true,
    };
    assert_eq!(x.encode(), 0x8000_0000_0007_0000);
    assert_eq!(l.indices(0x2000_0000 + 0x30000 + 5), (1, 3));
}

#[test]
fn standard_l2_entries() {
    let l = layout(16, false, false);
    let d = |raw| Cluster::decode(raw, 0x40000, &l).unwrap();
    assert_eq!(d(0), Cluster::Unallocated);
    assert_eq!(
        d(0x8000_0000_0009_0000),
        Cluster::Data {
            host_offset: 0x90000,
            copied: true
        }
    );
    assert_eq!(
        d(0x0000_0000_0009_0000),
        Cluster::Data {
            host_offset: 0x90000,
            copied: false
        }
    );
    assert_eq!(
        d(1),
        Cluster::Zero {
            host_offset: None,
            copied: false
        }
    );
    assert_eq!(
        d(0x8000_0000_0009_0001),
        Cluster::Zero {
            host_offset: Some(0x90000),
            copied: true
        }
    );
    // COPIED with offset 0 is unallocated unless there is a data file.
    assert_eq!(d(FLAG_COPIED), Cluster::Unallocated);
    let ext = layout(16, false, true);
    assert_eq!(
        Cluster::decode(FLAG_COPIED, 0, &ext).unwrap(),
        Cluster::Data {
            host_offset: 0,
            copied: true
        }
    );
    let e = Cluster::decode(0x9200, 0x40010, &l).unwrap_err();
    assert!(
        e.message().contains("offset 0x40010") && e.message().contains("aligned"),
        "{}",
        e.message()
    );
    for raw in [0, 1, 0x8000_0000_0009_0000, 0x8000_0000_0009_0001] {
        assert_eq!(d(raw).encode(&l), raw);
    }
}

#[test]
fn compressed_descriptors_depend_on_cluster_bits() {
    // 64 KiB clusters: x = 62 - 8 = 54; 3 additional sectors.
    let l = layout(16, false, false);
    let raw = FLAG_COMPRESSED | (3 << 54) | 0x12345;
    assert_eq!(
        Cluster::decode(raw, 0, &l).unwrap(),
        Cluster::Compressed {
            host_offset: 0x12345,
            compressed_len_bytes_upper_bound: 4 * 512 - 0x145
        }
    );
    assert_eq!(Cluster::decode(raw, 0, &l).unwrap().encode(&l), raw);
    // The same bits with 2 MiB clusters: x = 49, so bits 49.. are sectors.
    let l21 = layout(21, false, false);
    let raw21 = FLAG_COMPRESSED | (0x1fff << 49) | (1 << 48) | 0x200;
    assert_eq!(
        Cluster::decode(raw21, 0, &l21).unwrap(),
        Cluster::Compressed {
            host_offset: (1 << 48) | 0x200,
            compressed_len_bytes_upper_bound: 0x2000 * 512
        }
    );
    // 512-byte clusters: x = 61, one sector bit; offset bits above 55 must be 0.
    let l9 = layout(9, false, false);
    assert_eq!(
        Cluster::decode(FLAG_COMPRESSED | (1 << 61) | 0x3ff, 0, &l9).unwrap(),
        Cluster::Compressed {
            host_offset: 0x3ff,
            compressed_len_bytes_upper_bound: 1024 - 511
        }
    );
    let e = Cluster::decode(FLAG_COMPRESSED | (1 << 58) | 0x200, 8, &l9).unwrap_err();
    assert!(e.message().contains("above 55"), "{}", e.message());
    // Compressed clusters are not allowed with an external data file.
    assert!(Cluster::decode(raw, 0, &layout(16, false, true)).is_err());
    // The COPIED bit is ignored on compressed entries.
    assert!(matches!(
        Cluster::decode(raw | FLAG_COPIED, 0, &l).unwrap(),
        Cluster::Compressed {
            host_offset: 0x12345,
            ..
        }
    ));
}

#[test]
fn extended_l2_subclusters() {
    let l = layout(16, true, false);
    // Subclusters 0 and 2 allocated, 3 zero; bit 0 of the descriptor is no
    // zero flag here.
    let e = ExtendedL2Entry::decode(0x8000_0000_000a_0001, 0b101 | (0b1000 << 32), 0, &l).unwrap();
    assert_eq!(
        e.cluster,
        Cluster::Data {
            host_offset: 0xa0000,
            copied: true
        }
    );
    assert_eq!(e.allocated, 0b101);
    assert_eq!(e.zero, 0b1000);
    assert_eq!(
        e.subcluster(0, &l),
        Subcluster::Data {
            host_offset: 0xa0000
        }
    );
    assert_eq!(e.subcluster(1, &l), Subcluster::Unallocated);
    assert_eq!(
        e.subcluster(2, &l),
        Subcluster::Data {
            host_offset: 0xa0000 + 4096
        }
    );
    assert_eq!(e.subcluster(3, &l), Subcluster::Zero);
    assert_eq!(e.subcluster(31, &l), Subcluster::Unallocated);
    assert_eq!(
        e.encode(&l),
        (0x8000_0000_000a_0000, 0b101 | (0b1000 << 32))
    );
    // Unallocated cluster with zero subclusters: fine.
    let z = ExtendedL2Entry::decode(0, 0xffff_ffff_0000_0000, 0, &l).unwrap();
    assert_eq!(z.subcluster(17, &l), Subcluster::Zero);
    // Inconsistent bitmaps.
    let at = 0x50010;
    for (raw, bm, what) in [
        (0x000a_0000u64, 0x1_0000_0001u64, "both allocated and zero"),
        (0, 1, "no host offset"),
        (FLAG_COMPRESSED | 0x12345, 1, "compressed"),
    ] {
        let e = ExtendedL2Entry::decode(raw, bm, at, &l).unwrap_err();
        assert!(
            e.message().contains(what) && e.message().contains("offset 0x50018"),
            "{}",
            e.message()
        );
    }
    let c = ExtendedL2Entry::decode(FLAG_COMPRESSED | 0x12345, 0, 0, &l).unwrap();
    assert_eq!(c.subcluster(5, &l), Subcluster::Compressed);
}

#[test]
fn refcount_table_entries() {
    let l = layout(16, false, false);
    assert_eq!(decode_refcount_table_entry(0, 0, &l).unwrap(), None);
    assert_eq!(
        decode_refcount_table_entry(0x20000, 0, &l).unwrap(),
        Some(0x20000)
    );
    let e = decode_refcount_table_entry(0x20001, 0x10008, &l).unwrap_err();
    assert!(e.message().contains("reserved") && e.message().contains("0x10008"));
    assert!(decode_refcount_table_entry(0x20200, 0, &l).is_err());
}

#[test]
fn refcount_blocks_of_every_width() {
    let mut l = layout(9, false, false);
    // 1 bit, LSB first.
    l.refcount_order = 0;
    let b = [0b1000_0001u8, 0b0000_0010];
    assert_eq!(
        (0..10).map(|i| get_refcount(&b, i, &l)).collect::<Vec<_>>(),
        [1, 0, 0, 0, 0, 0, 0, 1, 0, 1]
    );
    assert_eq!(l.refcount_block_entries(), 4096);
    // 2 and 4 bits.
    l.refcount_order = 1;
    assert_eq!(get_refcount(&[0b1110_0100], 1, &l), 1);
    assert_eq!(get_refcount(&[0b1110_0100], 3, &l), 3);
    l.refcount_order = 2;
    assert_eq!(get_refcount(&[0x3a], 0, &l), 0xa);
    assert_eq!(get_refcount(&[0x3a], 1, &l), 0x3);
    // 8..64 bits, big-endian.
    l.refcount_order = 3;
    assert_eq!(get_refcount(&[7, 9], 1, &l), 9);
    l.refcount_order = 4;
    assert_eq!(get_refcount(&[0, 0, 0x12, 0x34], 1, &l), 0x1234);
    assert_eq!(l.refcount_block_entries(), 256);
    l.refcount_order = 5;
    assert_eq!(get_refcount(&[0, 0, 0, 0, 1, 2, 3, 4], 1, &l), 0x0102_0304);
    l.refcount_order = 6;
    assert_eq!(get_refcount(&[0xff; 16], 1, &l), u64::MAX);
    // set_refcount writes exactly its entry, and refuses what does not fit.
    for order in 0..=6 {
        l.refcount_order = order;
        let mut b = vec![0u8; 64];
        let max = if order == 6 {
            u64::MAX
        } else {
            (1 << (1 << order)) - 1
        };
        set_refcount(&mut b, 5, max, &l).unwrap();
        set_refcount(&mut b, 6, 1, &l).unwrap();
        assert_eq!(get_refcount(&b, 5, &l), max, "order {order}");
        assert_eq!(get_refcount(&b, 6, &l), 1, "order {order}");
        assert_eq!(get_refcount(&b, 4, &l), 0, "order {order}");
        assert_eq!(get_refcount(&b, 7, &l), 0, "order {order}");
        if order < 6 {
            assert!(set_refcount(&mut b, 5, max + 1, &l).is_err());
        }
    }
}

/// One snapshot table entry by hand: fixed part, extra, id, name, padding.
fn snapshot_bytes(l1: u64, l1_size: u32, extra: &[u8], id: &[u8], name: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 40];
    put64(&mut b, 0, l1);
    put32(&mut b, 8, l1_size);
    b[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
    b[14..16].copy_from_slice(&(name.len() as u16).to_be_bytes());
    put32(&mut b, 16, 1_700_000_000);
    put32(&mut b, 20, 123);
    put64(&mut b, 24, 456);
    put32(&mut b, 32, 789);
    put32(&mut b, 36, extra.len() as u32);
    b.extend_from_slice(extra);
    b.extend_from_slice(id);
    b.extend_from_slice(name);
    b.resize(b.len().div_ceil(8) * 8, 0);
    b
}

#[test]
fn snapshot_table() {
    let l = layout(16, false, false);
    let mut extra = [0u8; 16];
    put64(&mut extra, 0, 0x1000);
    put64(&mut extra, 8, 4 << 20);
    let mut t = snapshot_bytes(0x60000, 1, &extra, b"1", b"first");
    let first_len = t.len();
    t.extend(snapshot_bytes(0x80000, 2, &[], b"22", b"x"));
    let s = parse_snapshot_table(&t, 0x50000, 2, &l).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].l1_table_offset, 0x60000);
    assert_eq!(s[0].l1_size, 1);
    assert_eq!(s[0].id, b"1");
    assert_eq!(s[0].name, b"first");
    assert_eq!(
        (s[0].date_sec, s[0].date_nsec, s[0].vm_clock_nsec),
        (1_700_000_000, 123, 456)
    );
    assert_eq!(s[0].vm_state_size, 0x1000, "64-bit field wins");
    assert_eq!(s[0].vm_state_size_32, 789);
    assert_eq!(s[0].disk_size, Some(4 << 20));
    assert_eq!(s[1].vm_state_size, 789);
    assert_eq!(s[1].disk_size, None);
    assert_eq!(s[1].name, b"x");
    assert_eq!(s[0].to_bytes(), t[..first_len].to_vec());
    assert_eq!(s[1].to_bytes(), t[first_len..].to_vec());
    // A third entry that is not there, a misaligned L1, too much extra.
    let e = parse_snapshot_table(&t, 0x50000, 3, &l).unwrap_err();
    assert!(
        e.message().contains(&format!("{:#x}", 0x50000 + t.len())),
        "{}",
        e.message()
    );
    let bad = snapshot_bytes(0x60100, 1, &[], b"1", b"a");
    assert!(parse_snapshot_table(&bad, 0, 1, &l)
        .unwrap_err()
        .message()
        .contains("aligned"));
    let mut bad = snapshot_bytes(0x60000, 1, &[], b"1", b"a");
    put32(&mut bad, 36, 2000);
    assert!(parse_snapshot_table(&bad, 0, 1, &l)
        .unwrap_err()
        .message()
        .contains("extra"));
}

#[test]
fn fuzz_header_survives_mutations() {
    let mut base = v3();
    put64(&mut base, 8, 0x300);
    put32(&mut base, 16, 4);
    base[0x300..0x304].copy_from_slice(b"base");
    put_ext(&mut base, 112, EXT_BACKING_FORMAT, b"qcow2");
    let base = base[..0x400].to_vec();
    fuzz_header(&base);
    for n in 0..base.len() {
        fuzz_header(&base[..n]);
    }
    // Flip every byte of the header and extension area, one at a time.
    for i in 0..160 {
        for v in [0x00, 0x01, 0x80, 0xff] {
            let mut b = base.clone();
            b[i] = v;
            fuzz_header(&b);
        }
    }
    let mut r = 0x1234_5678_9abc_def0u64;
    for _ in 0..2000 {
        let mut b = base.clone();
        for _ in 0..4 {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            let i = (r % b.len() as u64) as usize;
            b[i] = (r >> 32) as u8;
        }
        fuzz_header(&b);
    }
}

#[test]
fn autoclear_bits_a_writer_clears() {
    let mut b = v3();
    put64(&mut b, 72, INCOMPAT_DATA_FILE);
    put64(&mut b, 88, AUTOCLEAR_DATA_FILE_RAW | (1 << 7));
    let h = Header::parse(&b).unwrap();
    assert!(h.data_file_raw());
    assert_eq!(h.autoclear_to_clear(), 1 << 7);
    let mut b = v3();
    put64(&mut b, 88, AUTOCLEAR_BITMAPS);
    let mut bm = [0u8; 24];
    put32(&mut bm, 0, 1);
    put64(&mut bm, 16, 0x40000);
    put_ext(&mut b, 112, EXT_BITMAPS, &bm);
    assert_eq!(
        Header::parse(&b).unwrap().autoclear_to_clear(),
        AUTOCLEAR_BITMAPS
    );
}

/// Found by fuzzing: a backing name at an offset that is not a multiple of
/// 8, inside the padding of the last extension. qemu reads it; the header
/// must survive `to_bytes` (the padding gives way to the name).
#[test]
fn backing_name_inside_last_extension_padding() {
    let mut b = v3();
    put_ext(&mut b, 112, EXT_BACKING_FORMAT, b"raw");
    put64(&mut b, 8, 123); // extension data ends at 123, padding to 128
    put32(&mut b, 16, 4);
    b[123..127].copy_from_slice(b"base");
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.backing_format(), Some(&b"raw"[..]));
    assert_eq!(h.backing_file.as_deref(), Some(&b"base"[..]));
    assert_eq!(h.to_bytes().unwrap(), b[..127].to_vec());
    fuzz_header(&b);
}

/// Found by fuzzing (`qcow2_header`): a backing_file_offset of u64::MAX
/// overflowed `offset + size` in the range check (a panic in debug builds,
/// and in release a wrapped sum that passed the check and then a slice out
/// of range). Refused, naming the field.
#[test]
fn backing_file_offset_near_u64_max() {
    let mut b = v3();
    put64(&mut b, 8, u64::MAX);
    put32(&mut b, 16, 8);
    let e = Header::parse(&b).unwrap_err();
    assert!(
        e.message().contains("backing_file_offset"),
        "{}",
        e.message()
    );
    put64(&mut b, 8, u64::MAX - 7);
    assert!(Header::parse(&b).is_err());
    fuzz_header(&b);
}
