//! The operator executable as built: its allocator and the allocator's settings. The memory figures
//! of the README (hack/bench.py) depend on both, and neither shows in behaviour: without this check
//! a build outside the settings would only show in the next benchmark.

use std::path::Path;

/// jemalloc's settings as `.cargo/config.toml` gives them to the build (`[env]`).
fn configured_malloc_conf() -> String {
    let config =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".cargo/config.toml"))
            .expect("read .cargo/config.toml");
    let line = config
        .lines()
        .find(|l| l.trim_start().starts_with("JEMALLOC_SYS_WITH_MALLOC_CONF"))
        .expect(".cargo/config.toml sets JEMALLOC_SYS_WITH_MALLOC_CONF");
    let value = line.split_once('=').expect("a key = value line").1.trim();
    value.trim_matches('"').to_owned()
}

#[test]
fn the_executable_runs_on_jemalloc_with_the_configured_settings() {
    let conf = configured_malloc_conf();
    for setting in ["narenas:1", "dirty_decay_ms:0", "muzzy_decay_ms:0"] {
        assert!(
            conf.split(',').any(|s| s == setting),
            "{setting} is what the README's memory figures were measured with; .cargo/config.toml has {conf:?}"
        );
    }
    let executable =
        std::fs::read(env!("CARGO_BIN_EXE_delegation-operator")).expect("read the executable");
    // jemalloc keeps the settings it was configured with as a string of its own (`opt.malloc_conf`
    // is read from it at start-up); it is in the executable only when jemalloc is linked in as the
    // allocator and was built with these settings.
    assert!(
        executable.windows(conf.len()).any(|w| w == conf.as_bytes()),
        "the executable does not carry jemalloc built with {conf:?}: is src/main.rs's #[global_allocator] gone, or was it built without .cargo/config.toml?"
    );
}
