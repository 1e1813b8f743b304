//! Making libtorch's CUDA backend visible to tch.
//!
//! The linker drops `libtorch_cuda.so` from the binary because no symbol of it is referenced directly
//! (`--as-needed`), so `tch::Cuda::device_count()` would report 0 GPUs even on a GPU machine. Loading the
//! library by hand, globally, registers the CUDA backend with libtorch's dispatcher.

use std::ffi::{CStr, CString};

/// The library name inside libtorch's `lib/` directory.
const TORCH_CUDA_LIB: &str = "libtorch_cuda.so";

/// Loads `libtorch_cuda.so` (RTLD_NOW | RTLD_GLOBAL): first from the libtorch the binary was built against
/// (`MGRUN_LIBTORCH_LIB`, set at compile time by the build script), then by bare name through the loader's
/// search path. Returns `None` on success, or the loader's error messages when no attempt worked (normal on
/// a CPU-only libtorch or a machine without a CUDA driver).
pub fn load_torch_cuda() -> Option<String> {
    let mut candidates = Vec::new();
    if let Some(lib_dir) = option_env!("MGRUN_LIBTORCH_LIB") {
        candidates.push(format!("{lib_dir}/{TORCH_CUDA_LIB}"));
    }
    candidates.push(TORCH_CUDA_LIB.to_string());

    let mut errors = Vec::new();
    for candidate in &candidates {
        match dlopen_global(candidate) {
            Ok(()) => return None,
            Err(message) => errors.push(format!("{candidate}: {message}")),
        }
    }
    Some(errors.join("; "))
}

fn dlopen_global(path: &str) -> Result<(), String> {
    let c_path = CString::new(path).map_err(|_| "path contains a NUL byte".to_string())?;
    // SAFETY: `c_path` is a valid NUL-terminated string; the handle is deliberately leaked so the library
    // stays loaded for the life of the process.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if !handle.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns NULL or a pointer to a NUL-terminated, thread-local message.
    let error = unsafe { libc::dlerror() };
    if error.is_null() {
        Err("dlopen failed".to_string())
    } else {
        // SAFETY: checked non-null above; copied before any other dl* call can overwrite it.
        Err(unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned())
    }
}

/// Checks that `requested` GPUs are visible before any rank is spawned, so `--gpus N` on the wrong machine
/// fails at once with a message that says what to do instead.
pub fn check_gpus(requested: usize, cuda_load_error: Option<&str>) -> anyhow::Result<()> {
    let visible = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
    if visible == 0 {
        let detail = match cuda_load_error {
            Some(error) => format!(" [{error}]"),
            None => String::new(),
        };
        anyhow::bail!(
            "--gpus {requested}: CUDA is not available on this machine (no driver / libtorch_cuda not loadable); \
             use --cpus N{detail}"
        );
    }
    if visible < requested {
        let mask = std::env::var("CUDA_VISIBLE_DEVICES")
            .map(|value| format!(" (CUDA_VISIBLE_DEVICES={value})"))
            .unwrap_or_default();
        anyhow::bail!("--gpus {requested}: only {visible} GPUs visible{mask}; use --gpus {visible} or fewer");
    }
    Ok(())
}
