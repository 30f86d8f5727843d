fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages and downloads.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/alveolus.proto");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/alveolus.proto"], &["proto"])?;
    Ok(())
}
