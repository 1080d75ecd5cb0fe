//! Third-party programs the integration tests run (Debian packages), found
//! on `PATH` or in the sbin directories (Debian installs `tor` in
//! /usr/sbin, which is not on a normal user's `PATH`). A missing program
//! fails the test at once with the one command that installs everything,
//! never a silent skip.

use std::path::PathBuf;

/// The single entry point that installs the programs below and runs the
/// whole suite (README, Quick start).
pub const TEST_ENTRY_POINT: &str = "./test.sh";

/// Where `program` is installed; panics naming [`TEST_ENTRY_POINT`] when it
/// is not, and the Debian package that ships it.
pub fn installed(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    let found = std::env::split_paths(&path).chain(extra).map(|dir| dir.join(program)).find(|candidate| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    });
    match found {
        Some(found) => found,
        None => panic!(
            "`{program}` is not installed; run `{TEST_ENTRY_POINT}`, which installs every program the tests \
             need (here Debian's `{}`) and runs the whole suite",
            package(program)
        ),
    }
}

/// The Debian package that ships `program` (the same name unless listed).
fn package(program: &str) -> &str {
    match program {
        "kill" => "procps",
        "ip" => "iproute2",
        "node" => "nodejs",
        other => other,
    }
}
