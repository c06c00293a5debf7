//! QEMU's block jobs as a reference: `qemu-storage-daemon` serving one
//! qcow2 image (node `top`, its backing chain opened from its header) with
//! a QMP monitor on a unix socket, driven by a minimal QMP client. Used to
//! compare our jobs with what QEMU's `block-stream` / `drive-mirror` leave
//! on disk (qemu-img has no offline command for them).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `qemu-storage-daemon` is installed (prints why a test skips).
pub fn have_qsd() -> bool {
    let ok = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "skipping {}: qemu-storage-daemon not found",
            std::thread::current().name().unwrap_or("a test")
        );
    }
    ok
}

/// A running daemon and its monitor connection.
pub struct Qsd {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read while waiting for a command's reply.
    events: std::collections::VecDeque<Value>,
    sock: std::path::PathBuf,
}

impl Qsd {
    /// Starts the daemon in `dir` on the qcow2 image `file` (node `top`).
    pub fn start(dir: &Path, file: &str) -> Qsd {
        let blockdev = format!("driver=qcow2,node-name=top,file.driver=file,file.filename={file}");
        Qsd::start_blockdev(dir, &blockdev)
    }

    /// Starts the daemon in `dir` with the root node `blockdev` (its
    /// `--blockdev` argument: `key=value` pairs or JSON).
    pub fn start_blockdev(dir: &Path, blockdev: &str) -> Qsd {
        // A fresh socket name per daemon: a stale one of an earlier daemon
        // in the same directory is never connected to.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sock = dir.join(format!("qmp-{}-{n}.sock", std::process::id()));
        let child = Command::new("qemu-storage-daemon")
            .current_dir(dir)
            .args([
                "--blockdev",
                blockdev,
                "--chardev",
                &format!("socket,id=m,path={},server=on,wait=off", sock.display()),
                "--monitor",
                "chardev=m",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon");
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "no QMP socket: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut q = Qsd {
            child,
            reader: BufReader::new(stream),
            writer,
            events: Default::default(),
            sock,
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        q.execute("qmp_capabilities", json!({})).unwrap();
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("QMP read");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).expect("QMP JSON")
    }

    /// Runs a command; `Err(desc)` for a QMP error. Events that arrive
    /// meanwhile are kept for [`Qsd::next_event`].
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let r = self.read();
            if let Some(v) = r.get("return") {
                return Ok(v.clone());
            }
            if let Some(e) = r.get("error") {
                return Err(e["desc"].as_str().unwrap_or_default().to_owned());
            }
            if r.get("event").is_some() {
                self.events.push_back(r);
            }
        }
    }

    /// The next event (kept or read).
    pub fn next_event(&mut self) -> Value {
        match self.events.pop_front() {
            Some(e) => e,
            None => self.read(),
        }
    }

    /// Waits for the event `name` and returns its data.
    pub fn wait_event(&mut self, name: &str) -> Value {
        loop {
            let r = self.next_event();
            if r["event"] == name {
                return r["data"].clone();
            }
        }
    }

    /// Runs a job command (`block-stream`, `drive-mirror`, ...) on node
    /// `top` with `args` and waits for it to end, completing it when it
    /// becomes ready; returns its `BLOCK_JOB_COMPLETED` data.
    pub fn run_job(&mut self, cmd: &str, mut args: Value) -> Result<Value, String> {
        args["job-id"] = json!("j");
        args["device"] = json!("top");
        self.execute(cmd, args)?;
        loop {
            let r = self.next_event();
            match r["event"].as_str() {
                Some("BLOCK_JOB_READY") => {
                    self.execute("job-complete", json!({"id": "j"}))?;
                }
                Some("BLOCK_JOB_COMPLETED") => return Ok(r["data"].clone()),
                _ => {}
            }
        }
    }

    /// Quits the daemon and waits for it.
    pub fn quit(mut self) {
        let _ = self.execute("quit", json!({}));
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        // After quit this only reaps; otherwise the daemon is not left behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
