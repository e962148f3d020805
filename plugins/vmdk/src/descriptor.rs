//! The text descriptor: `createType`, extent lines, parent hint and the disk database.

use haven_image::{Error, ErrorKind, Result, limits};

/// The start of every descriptor.
pub const SIGNATURE: &str = "# Disk DescriptorFile";

/// How an extent stores its sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// Raw sectors in a file, from a sector offset on.
    Flat,
    /// A hosted sparse extent ("KDMV").
    Sparse,
    /// No file: reads as zeros.
    Zero,
}

/// One extent line: `RW 131072 SPARSE "disk.vmdk"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    pub sectors: u64,
    pub kind: ExtentType,
    pub file: String,
    /// Start of the extent's data in its file, in sectors (flat extents).
    pub offset: u64,
}

/// What Haven uses of a descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub create_type: String,
    pub extents: Vec<ExtentLine>,
    pub parent_cid: Option<u32>,
    pub parent_hint: Option<String>,
}

fn bad(file: &str, at: u64, problem: impl std::fmt::Display) -> Error {
    Error::corrupt("vmdk", file, "descriptor line", at, problem)
}

/// Parses descriptor text. `file` and `base` (the descriptor's offset in `file`) name errors.
pub fn parse(text: &[u8], file: &str, base: u64) -> Result<Descriptor> {
    // An embedded descriptor is padded with NULs.
    let text = match text.iter().position(|&b| b == 0) {
        Some(n) => &text[..n],
        None => text,
    };
    let text = std::str::from_utf8(text).map_err(|e| {
        Error::corrupt(
            "vmdk",
            file,
            "descriptor",
            base + e.valid_up_to() as u64,
            "is not UTF-8 text",
        )
    })?;
    let mut d = Descriptor::default();
    let mut at = base;
    for raw in text.split('\n') {
        let line_at = at;
        at += raw.len() as u64 + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            if d.extents.len() >= limits::MAX_EXTENT_FILES {
                return Err(Error::limit(format!(
                    "vmdk: descriptor in {file} lists more than {} extents",
                    limits::MAX_EXTENT_FILES
                )));
            }
            d.extents.push(parse_extent(line, file, line_at)?);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(bad(
                file,
                line_at,
                format!("`{line}` is neither key=value nor an extent"),
            ));
        };
        let key = key.trim();
        let value = value.trim().trim_matches('"');
        match key {
            "createType" => d.create_type = value.to_owned(),
            "parentCID" => {
                let cid = u32::from_str_radix(value, 16).map_err(|_| {
                    bad(
                        file,
                        line_at,
                        format!("parentCID `{value}` is not a hex number"),
                    )
                })?;
                d.parent_cid = Some(cid);
            }
            "parentFileNameHint" => d.parent_hint = Some(value.to_owned()),
            _ => {}
        }
    }
    if d.create_type.is_empty() {
        return Err(bad(file, base, "createType is missing"));
    }
    Ok(d)
}

fn parse_extent(line: &str, file: &str, at: u64) -> Result<ExtentLine> {
    let mut parts = line.splitn(3, char::is_whitespace);
    let _access = parts.next();
    let sectors = parts.next().unwrap_or("");
    let rest = parts.next().unwrap_or("").trim_start();
    let sectors: u64 = sectors
        .parse()
        .map_err(|_| bad(file, at, format!("extent size `{sectors}` is not a number")))?;
    let (kind_word, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let kind = match kind_word {
        "FLAT" | "VMFS" => ExtentType::Flat,
        "SPARSE" => ExtentType::Sparse,
        "ZERO" => ExtentType::Zero,
        other => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "vmdk: extent type `{other}` in the descriptor of {file} is not supported \
                     (supported: FLAT, VMFS, SPARSE, ZERO); convert the disk with VMware tools first"
                ),
            ));
        }
    };
    if kind == ExtentType::Zero {
        return Ok(ExtentLine {
            sectors,
            kind,
            file: String::new(),
            offset: 0,
        });
    }
    let rest = rest.trim();
    let Some(rest) = rest.strip_prefix('"') else {
        return Err(bad(file, at, "extent file name is not in double quotes"));
    };
    let Some((name, tail)) = rest.split_once('"') else {
        return Err(bad(file, at, "extent file name has no closing quote"));
    };
    if name.is_empty() {
        return Err(bad(file, at, "extent file name is empty"));
    }
    let tail = tail.trim();
    let offset = if tail.is_empty() {
        0
    } else {
        tail.parse()
            .map_err(|_| bad(file, at, format!("extent offset `{tail}` is not a number")))?
    };
    Ok(ExtentLine {
        sectors,
        kind,
        file: name.to_owned(),
        offset,
    })
}

/// A descriptor for a new image.
pub fn generate(
    cid: u32,
    create_type: &str,
    extents: &[ExtentLine],
    sectors: u64,
    adapter: &str,
) -> String {
    let (heads, secs) = if adapter == "ide" {
        (16u64, 63u64)
    } else {
        (255, 63)
    };
    let cylinders = (sectors / (heads * secs)).min(16383);
    let mut s = format!(
        "{SIGNATURE}\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n\
         # Extent description\n"
    );
    for e in extents {
        let kind = match e.kind {
            ExtentType::Flat => "FLAT",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
        };
        match e.kind {
            ExtentType::Flat => {
                s += &format!("RW {} {kind} \"{}\" {}\n", e.sectors, e.file, e.offset)
            }
            ExtentType::Sparse => s += &format!("RW {} {kind} \"{}\"\n", e.sectors, e.file),
            ExtentType::Zero => s += &format!("RW {} {kind}\n", e.sectors),
        }
    }
    s += &format!(
        "\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"{heads}\"\n\
         ddb.geometry.sectors = \"{secs}\"\nddb.adapterType = \"{adapter}\"\n"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_extents_and_parent() {
        let text = b"# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=abcd\n\
            parentFileNameHint=\"base dir/b.vmdk\"\ncreateType=\"twoGbMaxExtentFlat\"\n\
            RW 100 FLAT \"a b-f001.vmdk\" 0\nRDONLY 50 ZERO\nRW 8 VMFS \"c.vmdk\" 4\n";
        let d = parse(text, "x.vmdk", 0).unwrap();
        assert_eq!(d.create_type, "twoGbMaxExtentFlat");
        assert_eq!(d.parent_cid, Some(0xabcd));
        assert_eq!(d.parent_hint.as_deref(), Some("base dir/b.vmdk"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file, "a b-f001.vmdk");
        assert_eq!(d.extents[1].kind, ExtentType::Zero);
        assert_eq!(d.extents[2].offset, 4);
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(
            parse(b"hello\n", "x", 0).unwrap_err().kind,
            ErrorKind::Corrupt
        );
        let e = parse(b"createType=\"a\"\nRW x FLAT \"f\"\n", "x", 0).unwrap_err();
        assert!(e.message.contains("extent size"), "{e}");
        let e = parse(b"createType=\"a\"\nRW 1 SESPARSE \"f\"\n", "x", 0).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported);
    }
}
