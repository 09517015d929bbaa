//! Cross-crate tests live in `tests/`; this library holds what they share with the benchmarks
//! (`bench/`).

/// `cargo`, without the variables cargo set for this process (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, …). Build scripts that read them (ring's does, through
/// `rerun-if-env-changed`) would see them changed from the shell's build and run again, and
/// their crates and every crate above them (rustls, sqlx, origin) would be rebuilt, then
/// rebuilt back by the next build from the shell.
pub fn cargo() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO"));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo = name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || matches!(
                &*name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            );
        if set_by_cargo {
            cmd.env_remove(&*name);
        }
    }
    cmd
}
