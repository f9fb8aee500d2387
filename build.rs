//! Build script: bakes libtorch's directory into every artifact's rpath (bins, tests, the Orthanc
//! plugin cdylib) so the dev tree runs with an empty environment; shipped files get an `$ORIGIN`
//! RUNPATH from scripts/package.sh instead. Feature `cuda` links libtorch_cuda; without it the CUDA
//! part is loaded at run time (src/runtime.rs). Feature `orthanc` compiles the C++ shim (cpp/).

fn main() {
    // torch-sys declares `links = "tch"`, so its metadata reaches us as DEP_TCH_*.
    let libtorch_lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB; is LIBTORCH set (see .cargo/config.toml)?");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    // -rpath and --no-as-needed are GNU/ELF linker flags: Linux only.
    if target_os == "linux" {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch_lib}");
        if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
            // Without this the linker drops libtorch_cuda.so (--as-needed) and tch never sees CUDA.
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
    println!("cargo:rustc-link-search=native={libtorch_lib}");
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "orthanc")]
    orthanc_shim();
}

/// The Orthanc SDK is a header of static-inline wrappers: the shim compiles them into the crate,
/// so the plugin has no link dependency on Orthanc (the header comes from Debian's orthanc-dev, or
/// from the folder `DESAM_ORTHANC_INCLUDE` names).
#[cfg(feature = "orthanc")]
fn orthanc_shim() {
    let mut build = cxx_build::bridge("src/orthanc/bridge.rs");
    if let Some(dir) = std::env::var_os("DESAM_ORTHANC_INCLUDE") {
        build.include(dir);
    }
    build
        .file("cpp/orthanc_shim.cc")
        .std("c++14")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .compile("desam_orthanc_shim");
    println!("cargo:rerun-if-env-changed=DESAM_ORTHANC_INCLUDE");
    println!("cargo:rerun-if-changed=src/orthanc/bridge.rs");
    println!("cargo:rerun-if-changed=cpp/orthanc_shim.cc");
    println!("cargo:rerun-if-changed=cpp/orthanc_shim.h");
}
