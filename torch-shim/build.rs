// Compiles src/shim.cpp against the libtorch headers of the libtorch that torch-sys links
// (DEP_TCH_LIBTORCH_LIB is its lib/ directory; LIBTORCH is the fallback), and gives the crate's
// tests an rpath to that libtorch like the other crates' build-support/rpath.rs does.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/shim.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
            PathBuf::from(lib).join("..")
        }
        Err(_) => match std::env::var("LIBTORCH") {
            Ok(root) => PathBuf::from(root),
            Err(_) => panic!("mgrun-torch-shim: neither DEP_TCH_LIBTORCH_LIB (from torch-sys) nor LIBTORCH is set"),
        },
    };
    let include = libtorch.join("include");
    if !include.join("ATen/autocast_mode.h").is_file() {
        panic!("mgrun-torch-shim: {} has no ATen headers (LIBTORCH must be a full libtorch 2.11)", include.display());
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        // GCC notes that 32-byte vector arguments changed ABI in GCC 4.6; they never cross the ABI here.
        .flag_if_supported("-Wno-psabi")
        .warnings(false)
        .compile("mgrun_torch_shim");
}
