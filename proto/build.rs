//! Generates the Rust code of `atlas.proto` at build time. The .proto is parsed by `protox`
//! (pure Rust), so neither a newcomer nor CI needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=atlas.proto");
    let descriptors = protox::compile(["atlas.proto"], ["."])?;
    tonic_prost_build::configure()
        // The worker's own result keeps this message as it is and writes it in `visualize`'s
        // JSON.
        .type_attribute(".atlas.v1.SecondAscent", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}
