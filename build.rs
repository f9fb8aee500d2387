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
}
