//! The deployment files (deploy/), checked without a container engine or a cluster: every YAML
//! file parses; every vgg-atlas command line in the compose file, the Kubernetes manifests, the
//! Dockerfiles and the scripts names a real subcommand and only flags it has; every script
//! passes `bash -n` and shellcheck; and the GPU check script runs end to end on the CPU.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn deploy_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    files(&root().join("deploy"), &mut out);
    out.sort();
    out
}

fn ext(p: &Path) -> &str {
    p.extension().and_then(|e| e.to_str()).unwrap_or("")
}

const SUBCOMMANDS: [&str; 13] = [
    "weights",
    "probe",
    "visualize",
    "render",
    "worker",
    "status",
    "mosaic",
    "query",
    "bench",
    "bench-coordinator",
    "bench-presets",
    "check-device",
    "help",
];

/// Command lines (argument lists after the binary) in a YAML value: every `command` or `args`
/// list that starts with a subcommand.
fn yaml_commands(v: &serde_yaml::Value, out: &mut Vec<Vec<String>>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, v) in m {
                if let (Some("command" | "args"), serde_yaml::Value::Sequence(items)) =
                    (k.as_str(), v)
                {
                    let words: Vec<String> = items
                        .iter()
                        .map(|i| match i {
                            serde_yaml::Value::String(s) => s.clone(),
                            other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                        })
                        .collect();
                    if words
                        .first()
                        .is_some_and(|w| SUBCOMMANDS.contains(&w.as_str()))
                    {
                        out.push(words);
                    }
                }
                yaml_commands(v, out);
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| yaml_commands(v, out)),
        _ => {}
    }
}

/// Command lines in shell text: `vgg-atlas SUB ...` or `"$bin" SUB ...`, with continuation
/// lines joined, up to the end of the command.
fn shell_commands(text: &str, out: &mut Vec<Vec<String>>) {
    let joined = text.replace("\\\n", " ");
    for line in joined.lines() {
        let line = line.trim_start();
        if line.starts_with('#') {
            continue;
        }
        for start in ["vgg-atlas ", "\"$bin\" "] {
            for (i, _) in line.match_indices(start) {
                let words: Vec<String> = line[i + start.len()..]
                    .split_whitespace()
                    .take_while(|w| {
                        !["|", ">", ";", "&&", "||", "2>&1"].contains(w) && !w.starts_with('>')
                    })
                    .map(|w| w.trim_matches('"').to_string())
                    .collect();
                if words
                    .first()
                    .is_some_and(|w| SUBCOMMANDS.contains(&w.as_str()))
                {
                    out.push(words);
                }
            }
        }
    }
}

/// `CMD [...]`/`ENTRYPOINT`-style JSON arrays and `RUN` lines of a Dockerfile.
fn dockerfile_commands(text: &str, out: &mut Vec<Vec<String>>) {
    shell_commands(text, out);
    for line in text.lines() {
        if let Some(json) = line.strip_prefix("CMD ") {
            let words: Vec<String> = serde_json::from_str(json).unwrap();
            if words
                .first()
                .is_some_and(|w| SUBCOMMANDS.contains(&w.as_str()))
            {
                out.push(words);
            }
        }
    }
}

fn help(sub: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_vgg-atlas"))
        .args(sub)
        .arg("--help")
        .output()
        .unwrap();
    assert!(o.status.success(), "vgg-atlas {sub:?} --help failed");
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn every_command_line_in_deploy_uses_real_subcommands_and_flags() {
    let mut checked = 0;
    for path in deploy_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let mut commands = Vec::new();
        match ext(&path) {
            "yaml" | "yml" => {
                for doc in serde_yaml::Deserializer::from_str(&text) {
                    let v = serde_yaml::Value::deserialize(doc)
                        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
                    yaml_commands(&v, &mut commands);
                }
            }
            "sh" | "sbatch" => shell_commands(&text, &mut commands),
            _ if name == "Dockerfile" => dockerfile_commands(&text, &mut commands),
            _ => continue,
        }
        for words in commands {
            let sub: Vec<&str> = if words[0] == "weights" {
                words[..2].iter().map(|s| s.as_str()).collect()
            } else {
                vec![words[0].as_str()]
            };
            let help = help(&sub);
            for flag in words.iter().filter(|w| w.starts_with("--")) {
                let flag = flag.split('=').next().unwrap();
                let known = help.match_indices(flag).any(|(i, _)| {
                    let after = help[i + flag.len()..].chars().next();
                    matches!(after, None | Some(' ' | ',' | '\n' | '='))
                });
                assert!(
                    known,
                    "{}: `vgg-atlas {}` has no flag {flag}",
                    path.display(),
                    sub.join(" ")
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "found only {checked} command lines in deploy/"
    );
}

#[test]
fn the_scripts_pass_bash_n_and_shellcheck() {
    let mut scripts: Vec<PathBuf> = deploy_files()
        .into_iter()
        .filter(|p| matches!(ext(p), "sh" | "sbatch"))
        .collect();
    scripts.push(root().join(".ci/run"));
    scripts.push(root().join("bench/compare.sh"));
    scripts.push(root().join("bench/gpu-bundle.sh"));
    assert!(scripts.len() >= 5);
    let shellcheck = Command::new("shellcheck").arg("--version").output().is_ok();
    assert!(
        shellcheck || std::env::var_os("CI").is_none(),
        "shellcheck is missing; .ci/run installs it"
    );
    for s in &scripts {
        let o = Command::new("bash").arg("-n").arg(s).output().unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            s.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        if shellcheck {
            let o = Command::new("shellcheck")
                .arg("-x")
                .arg(s)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "shellcheck {}:\n{}",
                s.display(),
                String::from_utf8_lossy(&o.stdout)
            );
        }
    }
    if !shellcheck {
        eprintln!("shellcheck not installed: only bash -n was run");
    }
}

/// deploy/gpu/check.sh as on a GPU machine, but on the CPU with tiny sizes: the same commands,
/// the same summary.
#[test]
fn the_gpu_check_script_runs_end_to_end_on_the_cpu() {
    let out = tempfile::tempdir().unwrap();
    let o = Command::new("bash")
        .arg(root().join("deploy/gpu/check.sh"))
        .arg(env!("CARGO_BIN_EXE_vgg-atlas"))
        .env("VGG_ATLAS_DEVICE", "cpu")
        .env("SIZE", "32")
        .env("STEPS", "2")
        .env("LAYERS", "block1_conv1 block2_conv1")
        .env("RENDER_LAYERS", "block1_conv1")
        .env("OUT", out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("device check: passed"), "{stdout}");
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("layer "))
        .skip(1)
        .collect();
    assert_eq!(table.len(), 2, "{stdout}");
    for row in table {
        let fps: f64 = row.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(fps > 0.0, "{row}");
    }
    assert!(out.path().join("render/atlas.png").exists());
}
