//! The qcow2 header and its extensions.

use haven_image::{Error, FileIo, Result, limits};

pub(crate) const FMT: &str = "qcow2";
pub(crate) const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Length of a version 3 header as written by this crate (with the compression type byte).
pub(crate) const V3_HEADER_LEN: u32 = 112;
const V2_HEADER_LEN: u32 = 72;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Where the bitmap directory lies (the bitmaps header extension).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub bitmaps: Option<BitmapsExt>,
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Entries of one L2 table (or of one cluster of an L1 table) for `cluster_bits`.
pub(crate) fn l2_entries(cluster_bits: u32) -> u64 {
    1 << (cluster_bits - 3)
}

/// L1 entries needed for a disk of `size` bytes.
pub(crate) fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    let per_l2 = 1u64 << (cluster_bits + cluster_bits - 3);
    size.div_ceil(per_l2)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Reads and validates the header of `file`, refusing features this crate cannot handle
    /// safely for reading.
    pub fn read<F: FileIo>(file: &F) -> Result<Self> {
        let name = file.name().to_owned();
        let file_len = file.len()?;
        let mut fixed = [0u8; 104];
        let n = fixed
            .len()
            .min(usize::try_from(file_len).unwrap_or(usize::MAX));
        file.read_exact_at(0, &mut fixed[..n], "qcow2 header")?;
        if n < V2_HEADER_LEN as usize || fixed[..4] != MAGIC {
            return Err(Error::corrupt(
                FMT,
                &name,
                "header",
                0,
                "has no qcow2 magic (QFI\\xfb) or is shorter than 72 bytes: not a qcow2 image",
            ));
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "qcow2: version {version} of file {name} is not supported (only versions 2 and 3)"
            )));
        }
        let cluster_bits = be32(&fixed, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::corrupt(
                FMT,
                &name,
                "header field cluster_bits",
                20,
                format!("is {cluster_bits}, outside 9..21 (512 bytes to 2 MiB clusters)"),
            ));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(&fixed, 24),
            l1_size: be32(&fixed, 36),
            l1_table_offset: be64(&fixed, 40),
            refcount_table_offset: be64(&fixed, 48),
            refcount_table_clusters: be32(&fixed, 56),
            nb_snapshots: be32(&fixed, 60),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            backing_file: None,
            backing_format: None,
            bitmaps: None,
        };
        let crypt_method = be32(&fixed, 32);
        let mut header_length = V2_HEADER_LEN;
        let mut compression_type = 0u8;
        if version == 3 {
            if n < 104 {
                return Err(Error::corrupt(
                    FMT,
                    &name,
                    "version 3 header",
                    0,
                    format!("needs 104 bytes but the file has {file_len}"),
                ));
            }
            h.incompatible = be64(&fixed, 72);
            h.compatible = be64(&fixed, 80);
            h.autoclear = be64(&fixed, 88);
            h.refcount_order = be32(&fixed, 96);
            header_length = be32(&fixed, 100);
            if header_length < 104 || u64::from(header_length) > cs {
                return Err(Error::corrupt(
                    FMT,
                    &name,
                    "header field header_length",
                    100,
                    format!("is {header_length}, outside 104..{cs}"),
                ));
            }
        }
        // The whole first cluster holds the header, its extensions and the backing file name.
        let first = cs.min(file_len) as usize;
        let mut c0 = vec![0u8; first];
        file.read_exact_at(0, &mut c0, "qcow2 header cluster")?;
        if version == 3 && header_length > 104 {
            if c0.len() <= 104 {
                return Err(Error::corrupt(
                    FMT,
                    &name,
                    "header",
                    0,
                    format!("is {header_length} bytes long but the file has {file_len}"),
                ));
            }
            compression_type = c0[104];
        }

        // Refuse what cannot be read correctly, naming the feature.
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        let feature_names = Self::parse_extensions(&mut h, &c0, header_length, &name)?;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let label = feature_names
                .iter()
                .find(|(t, b, _)| *t == 0 && u32::from(*b) == bit)
                .map(|(_, _, n)| format!(" (\"{n}\")"))
                .unwrap_or_default();
            return Err(Error::unsupported(format!(
                "qcow2: file {name} uses unknown incompatible feature bit {bit}{label}: \
                 it cannot be read safely; convert it with a newer qemu-img first"
            )));
        }
        if crypt_method != 0 {
            let kind = if crypt_method == 1 { "AES" } else { "LUKS" };
            return Err(Error::unsupported(format!(
                "qcow2: file {name} is encrypted ({kind}, crypt_method {crypt_method}); \
                 encrypted images are not supported: decrypt with qemu-img convert first"
            )));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(format!(
                "qcow2: file {name} keeps its data in an external data file \
                 (incompatible feature bit 2); external data files are not supported"
            )));
        }
        if h.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(Error::unsupported(format!(
                "qcow2: file {name} uses extended L2 entries (subclusters, incompatible \
                 feature bit 4), which are not supported: convert it without extended_l2"
            )));
        }
        if h.incompatible & INCOMPAT_COMPRESSION != 0 || compression_type != 0 {
            if h.incompatible & INCOMPAT_COMPRESSION == 0 {
                return Err(Error::corrupt(
                    FMT,
                    &name,
                    "header field compression_type",
                    104,
                    format!("is {compression_type} but incompatible feature bit 3 is clear"),
                ));
            }
            if compression_type != 0 {
                let what = if compression_type == 1 {
                    "zstd"
                } else {
                    "unknown"
                };
                return Err(Error::unsupported(format!(
                    "qcow2: file {name} uses {what} compression (compression_type \
                     {compression_type}); only deflate is supported"
                )));
            }
        }
        if h.refcount_order > 6 {
            return Err(Error::corrupt(
                FMT,
                &name,
                "header field refcount_order",
                96,
                format!("is {}, more than 6 (64-bit refcounts)", h.refcount_order),
            ));
        }
        if h.size > limits::MAX_DISK_SIZE {
            return Err(Error::limit(format!(
                "qcow2: file {name} has a virtual size of {} bytes, more than the {} bytes \
                 supported",
                h.size,
                limits::MAX_DISK_SIZE
            )));
        }
        let need_l1 = l1_entries_for(h.size, cluster_bits);
        if u64::from(h.l1_size) < need_l1 {
            return Err(Error::corrupt(
                FMT,
                &name,
                "header field l1_size",
                36,
                format!(
                    "is {} entries, too few for a {}-byte disk (needs {need_l1})",
                    h.l1_size, h.size
                ),
            ));
        }
        if u64::from(h.l1_size) * 8 > limits::MAX_TABLE_BYTES {
            return Err(Error::limit(format!(
                "qcow2: L1 table of file {name} has {} entries, more than the in-memory \
                 table limit of {} bytes allows",
                h.l1_size,
                limits::MAX_TABLE_BYTES
            )));
        }
        if h.l1_size > 0 && (h.l1_table_offset == 0 || !h.l1_table_offset.is_multiple_of(cs)) {
            return Err(Error::corrupt(
                FMT,
                &name,
                "L1 table",
                h.l1_table_offset,
                "is not aligned to a cluster",
            ));
        }
        if !h.refcount_table_offset.is_multiple_of(cs) {
            return Err(Error::corrupt(
                FMT,
                &name,
                "refcount table",
                h.refcount_table_offset,
                "is not aligned to a cluster",
            ));
        }
        if u64::from(h.refcount_table_clusters) * cs > limits::MAX_TABLE_BYTES {
            return Err(Error::limit(format!(
                "qcow2: refcount table of file {name} has {} clusters, more than the \
                 in-memory table limit of {} bytes allows",
                h.refcount_table_clusters,
                limits::MAX_TABLE_BYTES
            )));
        }

        // The backing file name.
        let bf_off = be64(&fixed, 8);
        if bf_off != 0 {
            let bf_size = u64::from(be32(&fixed, 16));
            if bf_size > 1023 || bf_off.saturating_add(bf_size) > c0.len() as u64 {
                return Err(Error::corrupt(
                    FMT,
                    &name,
                    "backing file name",
                    bf_off,
                    format!(
                        "({bf_size} bytes) does not fit in the first cluster or is longer \
                         than 1023 bytes"
                    ),
                ));
            }
            let raw = &c0[bf_off as usize..(bf_off + bf_size) as usize];
            let s = std::str::from_utf8(raw).map_err(|_| {
                Error::corrupt(FMT, &name, "backing file name", bf_off, "is not UTF-8")
            })?;
            if !s.is_empty() {
                h.backing_file = Some(s.to_owned());
            }
        }
        Ok(h)
    }

    /// Parses the header extensions; returns the feature name table (type, bit, name).
    fn parse_extensions(
        h: &mut Header,
        c0: &[u8],
        header_length: u32,
        name: &str,
    ) -> Result<Vec<(u8, u8, String)>> {
        let mut names = Vec::new();
        let mut at = header_length as usize;
        loop {
            if at + 8 > c0.len() {
                // qemu tolerates a missing end marker at the end of the cluster.
                return Ok(names);
            }
            let ty = be32(c0, at);
            let len = be32(c0, at + 4) as usize;
            let data_at = at + 8;
            if ty == EXT_END {
                return Ok(names);
            }
            if data_at.saturating_add(len) > c0.len() {
                return Err(Error::corrupt(
                    FMT,
                    name,
                    "header extension",
                    at as u64,
                    format!("(type {ty:#x}, {len} bytes) runs past the first cluster"),
                ));
            }
            let data = &c0[data_at..data_at + len];
            match ty {
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(data).map_err(|_| {
                        Error::corrupt(
                            FMT,
                            name,
                            "backing file format extension",
                            at as u64,
                            "is not UTF-8",
                        )
                    })?;
                    h.backing_format = Some(s.trim_end_matches('\0').to_owned());
                }
                EXT_FEATURE_NAMES => {
                    for e in data.chunks_exact(48) {
                        let n = e[2..].iter().position(|&b| b == 0).unwrap_or(46);
                        names.push((e[0], e[1], String::from_utf8_lossy(&e[2..2 + n]).into()));
                    }
                }
                EXT_BITMAPS => {
                    if len < 24 {
                        return Err(Error::corrupt(
                            FMT,
                            name,
                            "bitmaps extension",
                            at as u64,
                            format!("is {len} bytes, fewer than 24"),
                        ));
                    }
                    h.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                EXT_CRYPTO => {
                    return Err(Error::unsupported(format!(
                        "qcow2: file {name} has a full disk encryption header (LUKS); \
                         encrypted images are not supported"
                    )));
                }
                EXT_DATA_FILE => {
                    return Err(Error::unsupported(format!(
                        "qcow2: file {name} names an external data file; external data \
                         files are not supported"
                    )));
                }
                _ => {}
            }
            at = data_at + len.div_ceil(8) * 8;
        }
    }
}

/// A new version 3 header: `size` bytes, `cluster_bits`, 16-bit refcounts, no features.
pub(crate) fn encode_v3(
    size: u64,
    cluster_bits: u32,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
) -> Vec<u8> {
    let mut b = vec![0u8; V3_HEADER_LEN as usize + 8];
    b[0..4].copy_from_slice(&MAGIC);
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
    b[24..32].copy_from_slice(&size.to_be_bytes());
    b[36..40].copy_from_slice(&l1_size.to_be_bytes());
    b[40..48].copy_from_slice(&l1_table_offset.to_be_bytes());
    b[48..56].copy_from_slice(&refcount_table_offset.to_be_bytes());
    b[56..60].copy_from_slice(&refcount_table_clusters.to_be_bytes());
    b[96..100].copy_from_slice(&4u32.to_be_bytes());
    b[100..104].copy_from_slice(&V3_HEADER_LEN.to_be_bytes());
    // Bytes 104..112: compression type 0 (deflate) and padding; then the end extension.
    b
}
