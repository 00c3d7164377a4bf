//! Sets PyO3's cfgs for this crate and compiles the C shim (csrc/fiber_shim.c) against the headers of the very
//! interpreter pyo3 builds for. maturin exports that interpreter as
//! PYO3_PYTHON; `cargo` alone falls back to PYTHON_SYS_EXECUTABLE or
//! `python3`. The shim reads private fields of PyThreadState whose layout
//! differs per minor version, debug and free-threaded builds, so it must not
//! be compiled against any other headers.
use std::process::Command;

fn main() {
    // Emit PyO3's cfgs (Py_GIL_DISABLED, Py_3_x, ...) for this crate too, so
    // that code can select free-threaded or per-version paths.
    pyo3_build_config::use_pyo3_cfgs();

    println!("cargo:rerun-if-changed=csrc/fiber_shim.c");
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");

    let python = std::env::var("PYO3_PYTHON")
        .or_else(|_| std::env::var("PYTHON_SYS_EXECUTABLE"))
        .unwrap_or_else(|_| "python3".to_string());
    let out = Command::new(&python)
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['include'])",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} to find the Python headers: {e}"));
    if !out.status.success() {
        panic!(
            "{python} failed to report its include directory: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let include = String::from_utf8(out.stdout)
        .expect("include path is not UTF-8")
        .trim()
        .to_string();

    cc::Build::new()
        .file("csrc/fiber_shim.c")
        .include(&include)
        .flag_if_supported("-fno-strict-aliasing")
        .flag_if_supported("-std=c11")
        .warnings(true)
        .extra_warnings(true)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-missing-field-initializers")
        .compile("tokioloop_fiber_shim");
}
