//! Every example pipeline parses without a diagnostic and survives the round trips: through
//! `to_toml` and `parse`, through JSON, and through serde's own reading of the file.

use std::path::{Path, PathBuf};

use haven_pipeline::{Pipeline, diff, load, parse, to_toml};

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/pipelines");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn there_is_one_example_per_deployment_and_the_quickstart() {
    let names: Vec<String> = examples()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "azure-to-azure.toml",
            "hyperv-to-vmm.toml",
            "physical-to-azure.toml",
            "quickstart.toml",
            "vmware-to-vmware.toml",
        ]
    );
}

#[test]
fn every_example_parses_and_round_trips() {
    for path in examples() {
        let pipeline = load(&path).unwrap_or_else(|d| panic!("{}:\n{d}", path.display()));
        assert!(!pipeline.machines.is_empty(), "{}", path.display());

        let canonical = to_toml(&pipeline);
        let again = parse(&canonical, "canonical.toml")
            .unwrap_or_else(|d| panic!("{}: canonical form:\n{d}\n{canonical}", path.display()));
        assert_eq!(again, pipeline, "{}", path.display());
        assert_eq!(
            to_toml(&again),
            canonical,
            "{}: not canonical",
            path.display()
        );
        assert!(diff(&pipeline, &again).is_empty());

        let json = serde_json::to_string(&pipeline).unwrap();
        let from_json: Pipeline = serde_json::from_str(&json).unwrap();
        assert_eq!(from_json, pipeline, "{}: JSON", path.display());
        from_json.validate().unwrap();

        // serde reads the file to the same model: the two readers agree on shape and defaults.
        let source = std::fs::read_to_string(&path).unwrap();
        let by_serde: Pipeline = toml::from_str(&source).unwrap();
        assert_eq!(by_serde, pipeline, "{}: serde", path.display());
    }
}
