//! Records the git revision the binary is built from as `SMARTGATE_REVISION`
//! (`smartgate_build_info{revision}`): `SMARTGATE_REVISION` from the environment when set
//! (the container build, which has no `.git`), else `git rev-parse`, else `unknown`.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SMARTGATE_REVISION");
    let revision = std::env::var("SMARTGATE_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(git_revision)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=SMARTGATE_REVISION={revision}");
    // Rebuilt when HEAD moves: HEAD itself (a checkout) and the branch it points at (a
    // commit). Only paths that exist are named; a missing one would rerun every build.
    let head = Path::new(".git/HEAD");
    if head.exists() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        if let Ok(text) = std::fs::read_to_string(head)
            && let Some(branch) = text.trim().strip_prefix("ref: ")
        {
            let path = Path::new(".git").join(branch);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}

fn git_revision() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let rev = text.trim();
    (out.status.success() && !rev.is_empty() && rev.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| rev.to_owned())
}
