//! `tilefuse serve` on the shipped pair, driven by the official `openai`
//! Python client (`tests/serve_client.py`): completions streamed and not
//! (equal to each other and to `tilefuse generate`), chat, bad requests,
//! disconnects, a bounded load test, metrics, and SIGTERM with a request in
//! flight, after which the server must exit 0.
//!
//! Needs python3 with the `openai` package (`.ci/run` installs it under
//! `target/ci-python`, which is put on `PYTHONPATH`). Without them the test skips
//! with a message, unless `TILEFUSE_REQUIRE_CLIENT=1`, which makes it fail.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The queue size the server runs with: small, so the load test's 16
/// clients fill it and meet 429s.
const QUEUE: &str = "8";

/// Kills the server if the test ends early.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `PYTHONPATH` with the folder `.ci/run` installs the client into first.
fn python_path() -> String {
    let local: PathBuf = repo().join("target").join("ci-python");
    let mut parts = vec![local.display().to_string()];
    if let Ok(p) = std::env::var("PYTHONPATH") {
        if !p.is_empty() {
            parts.push(p);
        }
    }
    parts.join(":")
}

/// Whether python3 with `openai` is there; a reason when not.
fn client_available() -> Result<(), String> {
    match Command::new("python3")
        .args(["-c", "import openai"])
        .env("PYTHONPATH", python_path())
        .output()
    {
        Err(e) => Err(format!("python3 cannot run ({e})")),
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "python3 has no `openai` package ({}); `bash .ci/run` installs it, or \
             `python3 -m pip install --target target/ci-python openai==3.63.0`",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
    }
}

#[test]
fn openai_client_against_serve() {
    if let Err(why) = client_available() {
        if std::env::var("TILEFUSE_REQUIRE_CLIENT").as_deref() == Ok("1") {
            panic!("TILEFUSE_REQUIRE_CLIENT=1 but {why}");
        }
        eprintln!("skipping the openai client test: {why}");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_tilefuse");
    let mut child = Command::new(bin)
        .args(["serve", "--port", "0", "--queue", QUEUE])
        .current_dir(repo())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tilefuse binary starts");
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr is piped");
    let server = Server(child);

    // The server's log, kept for failure messages; the address when it listens.
    let log = Arc::new(Mutex::new(String::new()));
    let (url_tx, url_rx) = mpsc::channel();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("listening on ") {
                    let _ = url_tx.send(line[at + "listening on ".len()..].trim().to_string());
                }
                if let Ok(mut l) = log.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
    }
    let log_text = || log.lock().map(|l| l.clone()).unwrap_or_default();
    let url = url_rx
        .recv_timeout(Duration::from_secs(300))
        .unwrap_or_else(|_| panic!("the server never listened; its log:\n{}", log_text()));

    let out = Command::new("python3")
        .arg(repo().join("tests").join("serve_client.py"))
        .args(["--base-url", &url, "--tilefuse", bin, "--queue", QUEUE])
        .args(["--pid", &pid.to_string()])
        .env("PYTHONPATH", python_path())
        .current_dir(repo())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let py_err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the client checks failed\n--- client stdout\n{stdout}\n--- client stderr\n{py_err}\n--- server log\n{}",
        log_text()
    );
    eprintln!("{stdout}");

    // The client sent SIGTERM with a request in flight: the server finishes
    // it and exits 0.
    let mut server = server;
    let t0 = Instant::now();
    let status = loop {
        match server.0.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if t0.elapsed() < Duration::from_secs(120) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => panic!(
                "the server did not exit after SIGTERM ({other:?}); its log:\n{}",
                log_text()
            ),
        }
    };
    assert!(
        status.success(),
        "the server exited with {status} after SIGTERM; its log:\n{}",
        log_text()
    );
    assert!(
        log_text().contains("tilefuse serve: stopped"),
        "{}",
        log_text()
    );
}
