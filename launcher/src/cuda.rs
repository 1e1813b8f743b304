//! Making libtorch's CUDA backend visible to tch.
//!
//! The linker drops `libtorch_cuda.so` from the binary because no symbol of it is referenced directly
//! (`--as-needed`), so `tch::Cuda::device_count()` would report 0 GPUs even on a GPU machine. Loading the
//! library by hand, globally, registers the CUDA backend with libtorch's dispatcher.
//!
//! NCCL (through cudarc) is loaded by the name `libnccl.so`, which pip's NCCL wheel does not ship: the ranks
//! get a private directory with that link on their LD_LIBRARY_PATH ([`worker_library_path`]).

use std::ffi::{CStr, CString, OsString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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
pub fn check_gpus(requested: usize, ranks_per_gpu: usize, cuda_load_error: Option<&str>) -> anyhow::Result<()> {
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
    let mask = std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|value| format!(" (CUDA_VISIBLE_DEVICES={value})"))
        .unwrap_or_default();
    match gpu_shortfall(requested, ranks_per_gpu, visible, &mask) {
        Some(message) => anyhow::bail!(message),
        None => Ok(()),
    }
}

/// Why `requested` ranks at `ranks_per_gpu` per GPU do not fit on `visible` GPUs, if they do not.
fn gpu_shortfall(requested: usize, ranks_per_gpu: usize, visible: usize, mask: &str) -> Option<String> {
    let ranks_per_gpu = ranks_per_gpu.max(1);
    let needed = requested.div_ceil(ranks_per_gpu);
    if visible >= needed {
        return None;
    }
    let sharing = if ranks_per_gpu > 1 { format!(" at {ranks_per_gpu} ranks per GPU") } else { String::new() };
    Some(format!(
        "--gpus {requested}: {needed} GPU(s) needed{sharing} but only {visible} visible{mask}; use --gpus {} or fewer, \
         or let several ranks share each GPU to check a multi-rank run (--ranks-per-gpu {}; shared GPUs use the TCP \
         backend, since NCCL refuses two ranks on one GPU)",
        visible * ranks_per_gpu,
        requested.div_ceil(visible.max(1))
    ))
}

/// The name cudarc asks the loader for; pip's NCCL wheel and the libnccl2 package only ship `libnccl.so.2`.
const NCCL_LINK_NAME: &str = "libnccl.so";

/// The `LD_LIBRARY_PATH` for CUDA ranks: a private directory holding a `libnccl.so` link to the NCCL that
/// libtorch uses, in front of the launcher's own value (glibc reads the variable at process start, so it
/// has to be set for the spawned ranks). The error says where NCCL was looked for.
pub fn worker_library_path() -> Result<OsString, String> {
    static LINK_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let link_dir = LINK_DIR.get_or_init(|| {
        let library = find_libnccl()?;
        make_nccl_link(&private_link_base(), &library)
    });
    let link_dir = link_dir.clone()?;
    let mut value = link_dir.into_os_string();
    if let Some(existing) = std::env::var_os("LD_LIBRARY_PATH").filter(|existing| !existing.is_empty()) {
        value.push(":");
        value.push(existing);
    }
    Ok(value)
}

/// Looks for NCCL, best match first: the copy already mapped into this process (libtorch_cuda.so pulls in
/// its own), the libtorch install's (`torch/lib` next to `nvidia/nccl/lib` in a pip install), the
/// directories of LD_LIBRARY_PATH, then the loader cache (`ldconfig -p`).
fn find_libnccl() -> Result<PathBuf, String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut torch_lib_dirs: Vec<PathBuf> =
        mapped_libraries(&maps, "libtorch_cuda.so").filter_map(|path| path.parent().map(Path::to_path_buf)).collect();
    if let Some(lib_dir) = option_env!("MGRUN_LIBTORCH_LIB") {
        torch_lib_dirs.push(PathBuf::from(lib_dir));
    }
    let search_path = std::env::var_os("LD_LIBRARY_PATH");
    let ldconfig = std::process::Command::new("ldconfig")
        .arg("-p")
        .output()
        .or_else(|_| std::process::Command::new("/sbin/ldconfig").arg("-p").output())
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default();
    locate_libnccl(&maps, &torch_lib_dirs, search_path.as_deref(), &ldconfig).ok_or_else(|| {
        format!(
            "libnccl.so.2 not found (looked at the libraries loaded with libtorch_cuda.so, next to libtorch in {}, \
             in LD_LIBRARY_PATH and in `ldconfig -p`)",
            torch_lib_dirs.iter().map(|dir| dir.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

fn locate_libnccl(
    maps: &str,
    torch_lib_dirs: &[PathBuf],
    search_path: Option<&std::ffi::OsStr>,
    ldconfig: &str,
) -> Option<PathBuf> {
    if let Some(mapped) = mapped_libraries(maps, "libnccl.so").find(|path| path.is_file()) {
        return Some(mapped);
    }
    let next_to_torch = torch_lib_dirs.iter().flat_map(|dir| {
        [
            dir.join("libnccl.so.2"),
            dir.join("../../nvidia/nccl/lib/libnccl.so.2"),
            dir.join("../nvidia/nccl/lib/libnccl.so.2"),
        ]
    });
    let on_search_path = search_path
        .into_iter()
        .flat_map(std::env::split_paths)
        .filter(|dir| !dir.as_os_str().is_empty())
        .flat_map(|dir| [dir.join("libnccl.so.2"), dir.join(NCCL_LINK_NAME)]);
    let in_cache = ldconfig
        .lines()
        .filter(|line| line.trim_start().starts_with("libnccl.so"))
        .filter_map(|line| line.split("=>").nth(1))
        .map(|path| PathBuf::from(path.trim()));
    next_to_torch.chain(on_search_path).chain(in_cache).find(|path| path.is_file())
}

/// Paths of the mapped files of `/proc/self/maps` whose file name starts with `name`.
fn mapped_libraries<'a>(maps: &'a str, name: &'a str) -> impl Iterator<Item = PathBuf> + 'a {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(move |path| {
            path.starts_with('/')
                && Path::new(path).file_name().is_some_and(|file| file.to_string_lossy().starts_with(name))
        })
        .map(PathBuf::from)
}

/// Per-user directory for the links: `$XDG_RUNTIME_DIR/mgrun-nccl` (private by definition), else
/// `/tmp/mgrun-<uid>-nccl`, checked to be this user's and not writable by others.
fn private_link_base() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|dir| dir.is_dir()) {
        Some(runtime_dir) => runtime_dir.join("mgrun-nccl"),
        // SAFETY: geteuid has no preconditions.
        None => std::env::temp_dir().join(format!("mgrun-{}-nccl", unsafe { libc::geteuid() })),
    }
}

/// Makes `<base>/<hash of library path>/libnccl.so -> library` and returns that directory. One directory per
/// library keeps concurrent launchers of different installs apart; the link is replaced atomically.
fn make_nccl_link(base: &Path, library: &Path) -> Result<PathBuf, String> {
    let library = library.canonicalize().map_err(|e| format!("resolving {}: {e}", library.display()))?;
    private_dir(base)?;
    let dir = base.join(format!("{:016x}", fnv1a(library.as_os_str().as_encoded_bytes())));
    private_dir(&dir)?;
    let link = dir.join(NCCL_LINK_NAME);
    if std::fs::read_link(&link).is_ok_and(|target| target == library) {
        return Ok(dir);
    }
    let staging = dir.join(format!("{NCCL_LINK_NAME}.{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    std::os::unix::fs::symlink(&library, &staging)
        .and_then(|()| std::fs::rename(&staging, &link))
        .map_err(|e| format!("linking {} -> {}: {e}", link.display(), library.display()))?;
    Ok(dir)
}

/// Creates `dir` (mode 0700) or checks that the existing one is a directory of this user that nobody else
/// can write to: a library link in a directory someone else controls would run their code.
fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", dir.display())),
    }
    let metadata = std::fs::symlink_metadata(dir).map_err(|e| format!("checking {}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let owner_ok = metadata.uid() == unsafe { libc::geteuid() };
    if !metadata.is_dir() || !owner_ok || metadata.mode() & 0o022 != 0 {
        return Err(format!(
            "refusing to use {} for the libnccl.so link: not a directory of this user that only it can write",
            dir.display()
        ));
    }
    Ok(())
}

/// 64-bit FNV-1a: a stable name for a library path (std's hasher may change between Rust versions).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_is_found_next_to_a_pip_torch_then_on_the_search_path_then_in_the_cache() {
        let root = tempfile::tempdir().unwrap();
        let torch_lib = root.path().join("site-packages/torch/lib");
        let nccl_lib = root.path().join("site-packages/nvidia/nccl/lib");
        let search_dir = root.path().join("search");
        let cache_dir = root.path().join("cache");
        for dir in [&torch_lib, &nccl_lib, &search_dir, &cache_dir] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let ldconfig = format!(
            "3 libs found in cache `/etc/ld.so.cache'\n\tlibnccl.so.2 (libc6,x86-64) => {}/libnccl.so.2\n",
            cache_dir.display()
        );
        let search_path = std::env::join_paths([root.path().join("missing"), search_dir.clone()]).unwrap();
        let find = || locate_libnccl("", std::slice::from_ref(&torch_lib), Some(&search_path), &ldconfig);
        assert_eq!(find(), None);
        std::fs::write(cache_dir.join("libnccl.so.2"), b"").unwrap();
        assert_eq!(find(), Some(cache_dir.join("libnccl.so.2")));
        std::fs::write(search_dir.join("libnccl.so.2"), b"").unwrap();
        assert_eq!(find(), Some(search_dir.join("libnccl.so.2")));
        std::fs::write(nccl_lib.join("libnccl.so.2"), b"").unwrap();
        assert_eq!(find().unwrap().canonicalize().unwrap(), nccl_lib.join("libnccl.so.2").canonicalize().unwrap());
        // The copy libtorch_cuda.so already loaded wins over everything.
        let mapped = cache_dir.join("libnccl.so.2");
        let maps = format!("7f00-7f10 r-xp 00000000 08:01 42    {}\n7f10-7f20 rw-p 0 0:0 0 [heap]\n", mapped.display());
        let found = locate_libnccl(&maps, std::slice::from_ref(&torch_lib), Some(&search_path), &ldconfig);
        assert_eq!(found, Some(mapped));
    }

    #[test]
    fn link_dir_holds_a_libnccl_so_link_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let library = root.path().join("libnccl.so.2");
        std::fs::write(&library, b"not really NCCL").unwrap();
        let base = root.path().join("links");
        let dir = make_nccl_link(&base, &library).unwrap();
        let link = dir.join("libnccl.so");
        assert_eq!(std::fs::read_link(&link).unwrap(), library.canonicalize().unwrap());
        assert_eq!(std::fs::read(&link).unwrap(), b"not really NCCL");
        assert_eq!(std::fs::metadata(&base).unwrap().permissions().mode() & 0o777, 0o700);
        // Idempotent, and another library gets its own directory.
        assert_eq!(make_nccl_link(&base, &library).unwrap(), dir);
        let other = root.path().join("other.so.2");
        std::fs::write(&other, b"").unwrap();
        assert_ne!(make_nccl_link(&base, &other).unwrap(), dir);
        // A base directory that others can write to is refused.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = make_nccl_link(&base, &library).unwrap_err();
        assert!(error.contains("refusing"), "{error}");
    }
}

#[cfg(test)]
mod shortfall_tests {
    use super::gpu_shortfall;

    #[test]
    fn more_ranks_than_gpus_is_refused_unless_shared() {
        assert_eq!(gpu_shortfall(8, 1, 8, ""), None);
        assert_eq!(gpu_shortfall(3, 3, 1, ""), None);
        assert_eq!(gpu_shortfall(4, 3, 2, ""), None);
        let message = gpu_shortfall(3, 1, 1, " (CUDA_VISIBLE_DEVICES=0)").unwrap();
        assert!(message.contains("3 GPU(s) needed but only 1 visible (CUDA_VISIBLE_DEVICES=0)"), "{message}");
        assert!(message.contains("--ranks-per-gpu 3") && message.contains("NCCL refuses two ranks"), "{message}");
        let message = gpu_shortfall(5, 2, 2, "").unwrap();
        assert!(message.contains("3 GPU(s) needed at 2 ranks per GPU") && message.contains("--gpus 4"), "{message}");
    }
}

#[cfg(test)]
mod gpu_tests {
    use super::*;

    /// On a GPU machine: a process started with [`worker_library_path`] as its LD_LIBRARY_PATH can load
    /// `libnccl.so`, the name cudarc asks for (run it without any hand-made libnccl.so link on the path).
    /// Ignored where there is no GPU; scripts/gpu-check.sh runs it with --ignored.
    #[test]
    #[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it with --ignored"]
    fn ranks_can_load_nccl_by_the_name_cudarc_uses() {
        assert!(load_torch_cuda().is_none(), "libtorch_cuda does not load: this test needs a GPU machine");
        assert!(tch::Cuda::device_count() > 0, "no CUDA device: this test needs a GPU machine");
        let library_path = worker_library_path().expect("NCCL is found on a machine with libtorch_cuda");
        println!("LD_LIBRARY_PATH for ranks: {}", library_path.to_string_lossy());
        let status = std::process::Command::new("python3")
            .args(["-c", "import ctypes; ctypes.CDLL('libnccl.so')"])
            .env("LD_LIBRARY_PATH", &library_path)
            .status()
            .expect("python3 runs");
        assert!(status.success(), "libnccl.so not loadable with LD_LIBRARY_PATH={library_path:?}");
    }
}
