// Shared build script: give every binary and test of the crate an rpath to the libtorch it was
// linked against, so nothing needs LD_LIBRARY_PATH. torch-sys exports its lib dir as
// DEP_TCH_LIBTORCH_LIB to crates that depend on it directly.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-env=MGRUN_LIBTORCH_LIB={lib}");
    }
}
