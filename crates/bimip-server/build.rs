//! Rebuilds the crate when the embedded web demo (`web/dist`) changes: the embedding macro only
//! sees the files that existed when it last ran.

fn main() {
    println!("cargo:rerun-if-changed=web/dist");
}
