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

const SUBCOMMANDS: [&str; 14] = [
    "weights",
    "probe",
    "visualize",
    "render",
    "worker",
    "status",
    "mosaic",
    "query",
    "serve",
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

fn yaml_docs(path: &Path) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
        })
        .collect()
}

/// `${VAR}`, `${VAR:-x}`, `${VAR:?x}` names in a text.
fn interpolated(text: &str) -> Vec<String> {
    text.match_indices("${")
        .map(|(i, _)| {
            text[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// The command lines an operator copies from the deploy files' comments and from
/// docs/cluster.md's code blocks use real subcommands and flags too; a `--device` list goes only
/// to the commands that take one (one worker per device).
#[test]
fn command_lines_in_comments_and_docs_use_real_flags_and_device_lists_only_where_taken() {
    let mut commands = Vec::new();
    for path in deploy_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let comments: String = text
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix('#'))
            .filter(|l| !l.starts_with('!') && !l.starts_with("SBATCH"))
            .map(|l| format!("{l}\n"))
            .collect();
        shell_commands(&comments, &mut commands);
        // The commands themselves, for the device lists.
        match ext(&path) {
            "yaml" | "yml" => yaml_docs(&path)
                .iter()
                .for_each(|v| yaml_commands(v, &mut commands)),
            "sh" | "sbatch" => shell_commands(&text, &mut commands),
            _ => {}
        }
    }
    let doc = std::fs::read_to_string(root().join("docs/cluster.md")).unwrap();
    let mut in_code = false;
    let mut code = String::new();
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if in_code {
            code += line;
            code.push('\n');
        }
    }
    let from_docs = {
        let mut v = Vec::new();
        shell_commands(&code, &mut v);
        v
    };
    assert!(
        from_docs.len() >= 8,
        "found only {} in docs/cluster.md",
        from_docs.len()
    );
    commands.extend(from_docs);
    let mut helps = std::collections::HashMap::new();
    for words in &commands {
        let sub: Vec<&str> = if words[0] == "weights" {
            words[..2].iter().map(|s| s.as_str()).collect()
        } else {
            vec![words[0].as_str()]
        };
        let help = helps.entry(sub.join(" ")).or_insert_with(|| help(&sub));
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            let flag = flag.split('=').next().unwrap();
            let known = help.match_indices(flag).any(|(i, _)| {
                let after = help[i + flag.len()..].chars().next();
                matches!(after, None | Some(' ' | ',' | '\n' | '='))
            });
            assert!(
                known,
                "`vgg-atlas {}` has no flag {flag}: {words:?}",
                sub.join(" ")
            );
        }
        if let Some(i) = words.iter().position(|w| w == "--device") {
            let value = words.get(i + 1).map(String::as_str).unwrap_or("");
            if value.contains(',') || value.contains("DEVICES") || value.contains("$devices") {
                assert!(
                    ["render", "worker"].contains(&words[0].as_str()),
                    "{words:?}: only render and worker take a list of devices"
                );
            }
        }
    }
}

/// Compose: the GPU image is built for the GPU generation the operator sets (a build argument
/// the Dockerfile declares), the one worker container gets every GPU and one worker per listed
/// device, and every variable the file reads is in atlas.env.example.
#[test]
fn compose_builds_for_the_chosen_gpus_and_gives_the_worker_all_of_them() {
    let path = root().join("deploy/compose.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let compose = &yaml_docs(&path)[0];
    let services = compose["services"].as_mapping().unwrap();
    for (name, service) in services {
        let Some(build) = service.get("build") else {
            continue;
        };
        let dockerfile = root().join(build["dockerfile"].as_str().unwrap());
        let declared = std::fs::read_to_string(&dockerfile).unwrap();
        for (arg, _) in build
            .get("args")
            .and_then(|a| a.as_mapping())
            .into_iter()
            .flatten()
        {
            let arg = arg.as_str().unwrap();
            assert!(
                declared
                    .lines()
                    .any(|l| l.starts_with(&format!("ARG {arg}"))),
                "{name:?}: build arg {arg} is not an ARG of {}",
                dockerfile.display()
            );
        }
    }
    let worker = &compose["services"]["worker"];
    assert!(
        worker["build"]["args"]["CUDA_COMPUTE_CAP"]
            .as_str()
            .unwrap()
            .contains("${CUDA_COMPUTE_CAP"),
        "the GPU generation comes from the env file"
    );
    let devices = &worker["deploy"]["resources"]["reservations"]["devices"][0];
    assert_eq!(devices["count"].as_str(), Some("all"), "{devices:?}");
    let command: Vec<&str> = worker["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    let at = command.iter().position(|w| *w == "--device").unwrap();
    assert!(
        command[at + 1].starts_with("${WORKER_DEVICES"),
        "{command:?}"
    );
    // Every variable compose reads is in the example env file.
    let example = std::fs::read_to_string(root().join("deploy/atlas.env.example")).unwrap();
    for var in interpolated(&text) {
        assert!(
            example.lines().any(|l| l.starts_with(&format!("{var}="))),
            "compose.yaml reads {var}, which deploy/atlas.env.example does not set"
        );
    }
    // The coordinator writes under the volume's mount.
    let coordinator = &compose["services"]["coordinator"];
    assert_eq!(coordinator["volumes"][0].as_str(), Some("atlas:/out"));
    assert!(example.contains("ATLAS_OUT=/out/"));
}

/// Kubernetes: the project's images are named in kustomization.yaml's `images:` (the operator
/// points them at a registry), and the Secret's recipe puts one password both in PostgreSQL and
/// in the database URL.
#[test]
fn kustomize_names_the_images_and_the_secret_has_one_password() {
    let k8s = root().join("deploy/k8s");
    let kustomization = &yaml_docs(&k8s.join("kustomization.yaml"))[0];
    let named: Vec<&str> = kustomization["images"]
        .as_sequence()
        .expect("an images: section")
        .iter()
        .map(|i| {
            assert!(i["newName"].as_str().is_some(), "{i:?}");
            i["name"].as_str().unwrap()
        })
        .collect();
    fn images(v: &serde_yaml::Value, out: &mut Vec<String>) {
        match v {
            serde_yaml::Value::Mapping(m) => {
                for (k, v) in m {
                    if let (Some("image"), Some(s)) = (k.as_str(), v.as_str()) {
                        out.push(s.to_string());
                    }
                    images(v, out);
                }
            }
            serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| images(v, out)),
            _ => {}
        }
    }
    let mut used = Vec::new();
    for r in kustomization["resources"].as_sequence().unwrap() {
        for doc in yaml_docs(&k8s.join(r.as_str().unwrap())) {
            images(&doc, &mut used);
        }
    }
    let ours: Vec<&String> = used.iter().filter(|i| i.starts_with("vgg-atlas")).collect();
    assert!(ours.len() >= 2, "{used:?}");
    for image in ours {
        assert!(
            named.contains(&image.as_str()),
            "{image} is not in kustomization.yaml's images"
        );
    }
    let secret_path = k8s.join("secret.example.yaml");
    let secret = &yaml_docs(&secret_path)[0];
    let password = secret["stringData"]["postgres-password"].as_str().unwrap();
    let db = secret["stringData"]["db"].as_str().unwrap();
    assert!(db.contains(&format!(":{password}@")), "{db}");
    let recipe = std::fs::read_to_string(&secret_path).unwrap();
    assert!(
        recipe.contains("--from-literal=postgres-password=\"$pw\"")
            && recipe.contains("--from-literal=db=\"postgres://atlas:$pw@"),
        "the recipe uses one generated password twice"
    );
    assert!(!recipe.contains("atlas:PASSWORD@"));
    // Where kubectl is installed, kustomize builds the manifests with the images replaced.
    if let Ok(o) = Command::new("kubectl").arg("kustomize").arg(&k8s).output() {
        let built = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for line in built
            .lines()
            .filter(|l| l.trim_start().starts_with("image:"))
        {
            let image = line.trim_start().trim_start_matches("image:").trim();
            assert!(
                image.contains('/') || image.starts_with("postgres:"),
                "{image} is not a registry's image after kustomize"
            );
        }
    }
}

/// The SLURM scripts as SLURM would run them, on this machine: the coordinator with its
/// node-local SQLite database publishes its job's address file once it listens; a worker task
/// submitted with `--dependency=after:ID` finds it, finishes the run on the CPU and exits 0;
/// the coordinator copies the database to the output folder and removes its address file; a
/// second coordinator job resumes the run from that copy; a worker task that starts after its
/// coordinator has ended exits 0 at once; without the weights the coordinator stops and says
/// how to fetch them. (`squeue` is a stand-in that says what the test wants.)
#[test]
fn the_slurm_scripts_run_a_render_end_to_end_without_slurm() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out/atlas");
    let node = tmp.path().join("node");
    std::fs::create_dir_all(&node).unwrap();
    let squeue_says = |state: &str| {
        let dir = tmp.path().join(format!(
            "bin-{}",
            if state.is_empty() { "gone" } else { state }
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("squeue");
        std::fs::write(&script, format!("#!/bin/sh\necho {state}\n")).unwrap();
        Command::new("chmod")
            .arg("+x")
            .arg(&script)
            .status()
            .unwrap();
        format!("{}:{}", dir.display(), std::env::var("PATH").unwrap())
    };
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string()
    };
    let weights = vgg_atlas_worker::fetch::default_weights_path().unwrap();
    let script = |name: &str| {
        let mut c = Command::new("bash");
        c.arg(root().join("deploy/slurm").join(name))
            .current_dir(tmp.path())
            .env("VGG_ATLAS_TOKEN", "slurm-test-token-0123456789")
            .env("VGG_ATLAS_BIN", env!("CARGO_BIN_EXE_vgg-atlas"))
            .env("ATLAS_DIR", &out)
            .env("TMPDIR", &node)
            .env_remove("VGG_ATLAS_DB")
            .env_remove("VGG_ATLAS_CONNECT")
            .env_remove("ATLAS_COORDINATOR_JOB");
        c
    };
    let coordinator = |job: &str| {
        let mut c = script("coordinator.sbatch");
        c.env("SLURM_JOB_ID", job)
            .env("ATLAS_PORT", free())
            .env("ATLAS_METRICS_PORT", free())
            .env("VGG_ATLAS_WEIGHTS", &weights)
            .env("ATLAS_ARGS", "--layers block1_conv1 --size 32 --steps 2")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    };
    let coord = coordinator("4242").spawn().unwrap();
    let w = script("workers.sbatch")
        .env("PATH", squeue_says("RUNNING"))
        .env("SLURM_JOB_DEPENDENCY", "after:4242")
        .env("WORKER_DEVICES", "cpu")
        .env("WORKER_BATCH", "16")
        .env("SLURM_CPUS_PER_TASK", "1")
        .output()
        .unwrap();
    let werr = String::from_utf8_lossy(&w.stderr).to_string();
    let c = coord.wait_with_output().unwrap();
    let cerr = String::from_utf8_lossy(&c.stderr).to_string();
    assert!(w.status.success(), "worker: {werr}\ncoordinator: {cerr}");
    assert!(c.status.success(), "{cerr}");
    assert!(
        cerr.contains("coordinator-4242.addr") && cerr.contains("database copied"),
        "{cerr}"
    );
    assert!(
        !out.join("coordinator-4242.addr").exists(),
        "the address file is removed"
    );
    assert!(
        node.join("vgg-atlas-4242/atlas.db").exists(),
        "the database was node-local"
    );
    assert!(out.join("atlas.png").exists());
    let status = Command::new(env!("CARGO_BIN_EXE_vgg-atlas"))
        .args(["status", "--json", "--db"])
        .arg(format!("sqlite://{}", out.join("atlas.db").display()))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(rows[0]["done"], 64, "{rows}");

    // The next coordinator job starts from the copy and finds the run finished.
    let c = coordinator("4243").output().unwrap();
    let cerr = String::from_utf8_lossy(&c.stderr).to_string();
    assert!(c.status.success(), "{cerr}");
    assert!(cerr.contains("resuming run"), "{cerr}");

    // A worker task that starts after its coordinator job has ended holds no GPU.
    let t = std::time::Instant::now();
    let w = script("workers.sbatch")
        .env("PATH", squeue_says(""))
        .env("SLURM_JOB_DEPENDENCY", "after:4243")
        .output()
        .unwrap();
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    assert!(String::from_utf8_lossy(&w.stderr).contains("nothing to do"));
    assert!(t.elapsed() < std::time::Duration::from_secs(10));

    // Compute nodes do not fetch weights: a missing file is a clear stop.
    let c = coordinator("4244")
        .env("VGG_ATLAS_WEIGHTS", tmp.path().join("none.safetensors"))
        .output()
        .unwrap();
    let cerr = String::from_utf8_lossy(&c.stderr).to_string();
    assert_eq!(c.status.code(), Some(1), "{cerr}");
    assert!(
        cerr.contains("weights fetch") && cerr.contains("login node"),
        "{cerr}"
    );
}
