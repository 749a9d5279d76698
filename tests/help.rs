//! What the program says is what it does: the defaults its help names, the default output
//! folders, and the environment variables it reads.

mod common;

use common::*;

fn help(command: &str) -> String {
    let out = bin().args([command, "--help"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_help_names_the_real_default_preset() {
    let default = vgg_atlas_proto::method::DEFAULT_PRESET.name();
    for command in ["render", "visualize", "bench"] {
        let text = help(command);
        assert!(
            text.contains(&format!("{default} (the default")),
            "{command} --help names {default} as the default: {text}"
        );
        assert!(text.contains(&format!("[default: {default}]")), "{text}");
        for other in ["quick", "keras-vis", "lucid"] {
            assert!(
                !text.contains(&format!("{other} (the default")),
                "{command} --help calls {other} the default"
            );
        }
    }
}

#[test]
fn every_command_that_writes_a_folder_defaults_to_one_under_out() {
    for (command, default) in [
        ("render", "out/atlas"),
        ("mosaic", "out/atlas"),
        ("visualize", "out/visualize"),
        ("bench-presets", "out/bench-presets"),
    ] {
        let text = help(command);
        assert!(
            text.contains(&format!("[default: {default}]")),
            "{command} --out defaults to {default}: {text}"
        );
    }
    for command in ["status", "query", "mosaic", "serve"] {
        let text = help(command);
        assert!(
            text.contains("[env: VGG_ATLAS_DB") && text.contains("sqlite://out/atlas/atlas.db"),
            "{command} --db: {text}"
        );
    }
    // A real visualize with no --out writes under the working directory's out/.
    let cwd = tempfile::tempdir().unwrap();
    let out = bin()
        .current_dir(cwd.path())
        .args(["visualize", "--layer", "block1_conv1", "--filters", "0..2"])
        .args(["--size", "32", "--steps", "2", "--threads", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cwd.path().join("out/visualize/results.json").exists());
    assert!(cwd
        .path()
        .join("out/visualize/block1_conv1_0001.png")
        .exists());
}

#[test]
fn db_is_read_from_vgg_atlas_db() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.db");
    for command in [
        &["status"][..],
        &["query", "SELECT 1"],
        &["mosaic", "--out", "x"],
    ] {
        let out = bin()
            .current_dir(dir.path())
            .args(command)
            .env("VGG_ATLAS_DB", format!("sqlite://{}", missing.display()))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            said.contains(&missing.display().to_string()),
            "{command:?} looked at VGG_ATLAS_DB's database: {said}"
        );
    }
}
