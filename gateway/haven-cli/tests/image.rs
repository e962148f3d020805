//! `haven image` end to end: the real binary, the real format plugins (built by
//! `cargo xtask build`), images made and checked by qemu-img.

use std::path::Path;
use std::process::{Command, Output};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 64 << 20;

fn haven(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_haven"));
    if let Some(dir) = std::env::var_os("HAVEN_PLUGIN_DIR") {
        cmd.env("HAVEN_PLUGIN_DIR", dir);
    }
    // Precompiled plugins shared by every test of this run.
    cmd.env(
        "HAVEN_CACHE_DIR",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache"),
    );
    cmd.args(args).output().expect("run haven")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "haven failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sh(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// qemu-io commands that write patterns at random sector-aligned offsets (most not aligned to
/// any cluster or grain), zero some ranges and discard others.
fn workload(seed: u64, size: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cmds = Vec::new();
    for i in 0..40 {
        let len = rng.random_range(1..512u64) * 512;
        let offset = rng.random_range(0..(size - len) / 512) * 512;
        cmds.push(match i % 8 {
            6 => format!("write -z {offset} {len}"),
            7 => format!("discard {offset} {len}"),
            _ => format!("write -P {} {offset} {len}", rng.random_range(1..=255u8)),
        });
    }
    cmds
}

fn qemu_io(format: &str, image: &Path, cmds: &[String]) {
    let mut args = vec!["-f", format];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(p(image));
    sh("qemu-io", &args);
}

/// One image kind qemu-img can make: its qemu format, create options and Haven's name.
struct Kind {
    qemu: &'static str,
    options: &'static str,
    haven: &'static str,
    /// Whether Haven must be told the format (a fixed VHD has no header).
    explicit: bool,
}

const QEMU_KINDS: &[Kind] = &[
    Kind {
        qemu: "qcow2",
        options: "",
        haven: "qcow2",
        explicit: false,
    },
    Kind {
        qemu: "vmdk",
        options: "subformat=monolithicSparse",
        haven: "vmdk",
        explicit: false,
    },
    Kind {
        qemu: "vmdk",
        options: "subformat=monolithicFlat",
        haven: "vmdk",
        explicit: false,
    },
    Kind {
        qemu: "vmdk",
        options: "subformat=twoGbMaxExtentSparse",
        haven: "vmdk",
        explicit: false,
    },
    Kind {
        qemu: "vmdk",
        options: "subformat=twoGbMaxExtentFlat",
        haven: "vmdk",
        explicit: false,
    },
    Kind {
        qemu: "vhdx",
        options: "subformat=dynamic",
        haven: "vhdx",
        explicit: false,
    },
    Kind {
        qemu: "vhdx",
        options: "subformat=fixed",
        haven: "vhdx",
        explicit: false,
    },
    Kind {
        qemu: "vpc",
        options: "subformat=dynamic",
        haven: "vhd",
        explicit: false,
    },
    Kind {
        qemu: "vpc",
        options: "subformat=fixed,force_size=on",
        haven: "vhd",
        explicit: true,
    },
];

#[test]
fn haven_reads_qemu_images_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    for (i, kind) in QEMU_KINDS.iter().enumerate() {
        let image = dir.path().join(format!("img{i}.{}", kind.qemu));
        let mut create = vec!["create", "-q", "-f", kind.qemu];
        if !kind.options.is_empty() {
            create.extend(["-o", kind.options]);
        }
        create.extend([p(&image), "64M"]);
        sh("qemu-img", &create);
        qemu_io(kind.qemu, &image, &workload(i as u64, SIZE));

        let reference = dir.path().join(format!("ref{i}.raw"));
        sh(
            "qemu-img",
            &[
                "convert",
                "-f",
                kind.qemu,
                "-O",
                "raw",
                p(&image),
                p(&reference),
            ],
        );
        let ours = dir.path().join(format!("ours{i}.raw"));
        let mut convert = vec!["image", "convert"];
        if kind.explicit {
            convert.extend(["-f", kind.haven]);
        }
        convert.extend(["-O", "raw", p(&image), p(&ours)]);
        ok(haven(&convert));
        let what = format!("{} {}", kind.qemu, kind.options);
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&reference).unwrap(),
            "{what}"
        );

        // Detection and info agree with the kind.
        let mut info = vec!["image", "info", "--output", "json"];
        if kind.explicit {
            info.extend(["-f", kind.haven]);
        }
        info.push(p(&image));
        let info: serde_json::Value = serde_json::from_str(&ok(haven(&info))).unwrap();
        assert_eq!(info["format"], kind.haven, "{what}");
        let qemu = sh(
            "qemu-img",
            &["info", "-f", kind.qemu, "--output=json", p(&image)],
        )
        .stdout;
        let qemu: serde_json::Value = serde_json::from_slice(&qemu).unwrap();
        assert_eq!(info["virtual-size"], qemu["virtual-size"], "{what}");
    }
}

/// Formats Haven writes, as `-O` and `-o` arguments.
const TARGETS: &[(&str, &str)] = &[
    ("raw", ""),
    ("qcow2", ""),
    ("vmdk", "subformat=monolithicSparse"),
    ("vmdk", "subformat=monolithicFlat"),
    ("vmdk", "subformat=streamOptimized"),
    ("vhdx", "subformat=dynamic"),
    ("vhdx", "subformat=fixed"),
    ("vhd", "subformat=dynamic"),
    ("vhd", "subformat=fixed"),
];

fn qemu_name(format: &str) -> &str {
    if format == "vhd" { "vpc" } else { format }
}

fn convert_to(src: &Path, src_format: &str, (format, options): (&str, &str), dst: &Path) {
    let mut args = vec!["image", "convert", "-f", src_format, "-O", format];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([p(src), p(dst)]);
    ok(haven(&args));
}

/// Bytes the map says hold data.
fn data_bytes(image: &Path, format: &str) -> u64 {
    let out = ok(haven(&[
        "image",
        "map",
        "-f",
        format,
        "--output",
        "json",
        p(image),
    ]));
    let map: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        map.iter()
            .map(|e| e["length"].as_u64().unwrap())
            .sum::<u64>(),
        SIZE
    );
    map.iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn round_trips_between_every_pair_keep_content_and_sparseness() {
    let dir = tempfile::tempdir().unwrap();
    // A source with 3 MiB of data in a few places; the rest never written.
    let source = dir.path().join("source.raw");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "raw", p(&source), "64M"],
    );
    qemu_io(
        "raw",
        &source,
        &[
            "write -P 0x61 0 1M".into(),
            "write -P 0x62 9437184 4096".into(),
            "write -P 0x63 33554944 1M".into(),
            "write -P 0x64 66060288 1048576".into(),
        ],
    );
    for (i, &first) in TARGETS.iter().enumerate() {
        let a = dir.path().join(format!("a{i}.{}", first.0));
        convert_to(&source, "raw", first, &a);
        for (j, &second) in TARGETS.iter().enumerate() {
            let b = dir.path().join(format!("b{i}-{j}.{}", second.0));
            convert_to(&a, first.0, second, &b);
            let what = format!("{first:?} -> {second:?}");
            let cmp = Command::new("qemu-img")
                .args([
                    "compare",
                    "-q",
                    "-f",
                    "raw",
                    "-F",
                    qemu_name(second.0),
                    p(&source),
                    p(&b),
                ])
                .status()
                .unwrap();
            assert!(cmp.success(), "{what}: content differs");
            if matches!(second.0, "qcow2" | "vmdk" | "vhdx") {
                sh("qemu-img", &["check", "-q", "-f", second.0, p(&b)]);
            }
            // Sparse: what holds data is the source's 3 MiB rounded out to the format's
            // allocation unit (at most a few blocks), never the whole disk.
            let data = data_bytes(&b, second.0);
            let fixed = second.1.contains("fixed");
            if fixed {
                // Fixed formats allocate everything in their tables; their holes are the file's.
                let on_disk = std::fs::metadata(&b)
                    .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                    .unwrap();
                assert!(
                    on_disk < 24 << 20,
                    "{what}: {on_disk} bytes on disk for 3 MiB of data"
                );
            } else {
                assert!(data >= 3 << 20, "{what}: only {data} bytes of data mapped");
                assert!(
                    data <= 40 << 20,
                    "{what}: {data} bytes mapped as data for 3 MiB"
                );
            }
            std::fs::remove_file(&b).unwrap();
            let flat = dir.path().join(format!("b{i}-{j}-flat.vmdk"));
            let _ = std::fs::remove_file(flat);
        }
    }
}

#[test]
fn compare_names_the_first_difference() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.raw");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", p(&a), "64M"]);
    sh("qemu-img", &["create", "-q", "-f", "raw", p(&b), "64M"]);
    qemu_io("qcow2", &a, &["write -P 7 1M 64K".into()]);
    qemu_io("raw", &b, &["write -P 7 1M 64K".into()]);
    assert_eq!(
        ok(haven(&["image", "compare", p(&a), p(&b)])),
        "Images are identical.\n"
    );
    qemu_io("raw", &b, &["write -P 8 1052672 512".into()]);
    let out = haven(&["image", "compare", p(&a), p(&b)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Content mismatch at offset 1052672!\n"
    );
    // A larger image whose extra part is zero is identical, unless strict.
    let c = dir.path().join("c.raw");
    sh("qemu-img", &["create", "-q", "-f", "raw", p(&c), "65M"]);
    qemu_io("raw", &c, &["write -P 7 1M 64K".into()]);
    assert_eq!(
        ok(haven(&["image", "compare", p(&a), p(&c)])),
        "Images are identical.\n"
    );
    let out = haven(&["image", "compare", "-s", p(&a), p(&c)]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn azure_fixed_vhd_has_the_exact_size() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("azure.vhd");
    ok(haven(&[
        "image",
        "create",
        "-f",
        "vhd",
        "-o",
        "subformat=fixed",
        p(&disk),
        "101M",
    ]));
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), (101 << 20) + 512);
    let info = sh(
        "qemu-img",
        &["info", "-f", "vpc", "--output=json", p(&disk)],
    )
    .stdout;
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    assert_eq!(info["virtual-size"], 101u64 << 20);
    // Not a whole MiB: refused, naming the next valid size.
    let out = haven(&[
        "image",
        "create",
        "-f",
        "vhd",
        "-o",
        "subformat=fixed",
        p(&dir.path().join("x.vhd")),
        "1000000",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("whole MiB") && err.contains("1048576"),
        "{err}"
    );
    assert!(
        !dir.path().join("x.vhd").exists(),
        "a refused create left a file"
    );
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("cut.qcow2");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&image), "64M"],
    );
    qemu_io("qcow2", &image, &["write -P 1 0 4M".into()]);
    let len = std::fs::metadata(&image).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = haven(&[
        "image",
        "convert",
        "-O",
        "raw",
        p(&image),
        p(&dir.path().join("out.raw")),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cut.qcow2"), "the error names the file: {err}");
    assert!(
        !dir.path().join("out.raw").exists(),
        "a failed convert left its destination behind"
    );

    let out = haven(&["image", "info", "-f", "floppy", p(&image)]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("unknown format `floppy` (known: raw, vmdk, vhdx, vhd, qcow2)")
    );
    let out = haven(&["image", "info", p(&dir.path().join("missing.vmdk"))]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.vmdk: no such file"));
}

#[test]
fn plugins_are_listed_with_their_identity() {
    let out = ok(haven(&["plugin", "list"]));
    for format in ["raw", "vmdk", "vhdx", "vhd", "qcow2"] {
        assert!(
            out.contains(&format!("  {format:<6} {format} 0.1.0: ")),
            "{out}"
        );
    }
}
