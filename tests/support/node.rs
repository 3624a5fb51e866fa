//! Real third-party servers from npm, started for end-to-end tests (tests/e2e/).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// tests/e2e, where package.json and the server scripts are.
pub fn e2e_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e")
}

/// Makes sure the npm packages are installed (`npm ci`, once per test binary).
pub fn ensure_npm_packages() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap();
    if *done {
        return;
    }
    let dir = e2e_dir();
    if !dir.join("node_modules/.package-lock.json").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm (Node.js 20+) is needed for the end-to-end tests");
        assert!(status.success(), "npm ci failed in {}", dir.display());
    }
    *done = true;
}

/// A node process, killed on drop.
pub struct NodeServer {
    child: Child,
    /// What the script printed after `LISTENING `.
    pub address: String,
}

impl NodeServer {
    /// Starts `node script` in tests/e2e with `env`, and waits for its `LISTENING <addr>`.
    pub fn start(script: &str, args: &[&str], env: &[(&str, String)]) -> NodeServer {
        ensure_npm_packages();
        let mut cmd = Command::new("node");
        cmd.arg(script)
            .args(args)
            .current_dir(e2e_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .expect("node (20+) is needed for the end-to-end tests");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("LISTENING ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let address = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("{script} did not start");
            }
        };
        NodeServer { child, address }
    }
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
