//! Generates the Rust types and their canonical JSON mapping from `proto/` with a pure-Rust
//! protobuf parser (protox), so a fresh machine needs no `protoc`.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        root.join("bimip/v1/bimip.proto"),
        root.join("bimip/store/v1/records.proto"),
        root.join("bimip/store/v1/push.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let descriptors = protox::compile(&files, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out.join("bimip_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;

    let mut config = prost_build::Config::new();
    config
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .bytes(["."]);
    config.compile_protos(&files, &[&root])?;

    let descriptor_set = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .ignore_unknown_fields()
        .register_descriptors(&descriptor_set)?
        .build(&[".bimip.v1", ".bimip.store.v1"])?;
    Ok(())
}
