//! Build script: bakes libtorch's directory into every artifact's rpath (bins, tests, the Orthanc
//! plugin cdylib) so they run with an empty environment, and keeps libtorch_cuda linked so that
//! CUDA is found on a GPU host. The Orthanc C++ shim (cpp/) is compiled here too.

fn main() {
    // torch-sys declares `links = "tch"`, so its metadata reaches us as DEP_TCH_*.
    let libtorch_lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB; is LIBTORCH set (see .cargo/config.toml)?");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch_lib}");
    // Without this the linker drops libtorch_cuda.so (--as-needed) and tch never sees CUDA.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    println!("cargo:rustc-link-search=native={libtorch_lib}");
    println!("cargo:rerun-if-changed=build.rs");

    // The Orthanc SDK is a header of static-inline wrappers: the shim compiles them into the crate,
    // so the plugin has no link dependency on Orthanc (the header comes from Debian's orthanc-dev).
    cxx_build::bridge("src/orthanc/bridge.rs")
        .file("cpp/orthanc_shim.cc")
        .std("c++14")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .compile("desam_orthanc_shim");
    println!("cargo:rerun-if-changed=src/orthanc/bridge.rs");
    println!("cargo:rerun-if-changed=cpp/orthanc_shim.cc");
    println!("cargo:rerun-if-changed=cpp/orthanc_shim.h");
}
