//! Compiles `proto/` with protox (pure Rust), so building needs no system `protoc`. The encoded
//! descriptor set is kept for gRPC server reflection.

use prost::Message as _;
use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "dnstap/dnstap.proto",
    "dnsflow/v1/dnstap.proto",
    "dnsflow/v1/flowd.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
