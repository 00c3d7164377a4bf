fn main() {
    // Emit PyO3's cfgs (Py_GIL_DISABLED, Py_3_x, ...) for this crate too, so
    // that code can select free-threaded or per-version paths.
    pyo3_build_config::use_pyo3_cfgs();
}
