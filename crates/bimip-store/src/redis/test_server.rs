//! A throwaway `redis-server` for tests and benchmarks: a free loopback port, a temporary
//! folder, the settings bimip needs for "no acknowledged message lost" (`appendonly yes`,
//! `appendfsync always`, no RDB snapshots). Killed when dropped.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running `redis-server` child process.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    _tmp: Option<tempfile_dir::TempDir>,
}

mod tempfile_dir {
    /// A folder removed when dropped (without a dev-dependency on `tempfile` in library code).
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The `redis-server` binary: `$BIMIP_REDIS_SERVER`, else `redis-server` on the PATH.
pub fn redis_server_binary() -> PathBuf {
    std::env::var_os("BIMIP_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl RedisServer {
    /// Starts a server in a new temporary folder.
    pub fn start() -> std::io::Result<RedisServer> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "bimip-redis-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        ));
        std::fs::create_dir_all(&dir)?;
        let mut s = RedisServer {
            child: None,
            port: 0,
            dir: dir.clone(),
            _tmp: Some(tempfile_dir::TempDir(dir)),
        };
        s.spawn_on_free_port()?;
        Ok(s)
    }

    /// Starts a server keeping its files in `dir` (which must exist).
    pub fn start_in(dir: &Path) -> std::io::Result<RedisServer> {
        let mut s = RedisServer {
            child: None,
            port: 0,
            dir: dir.to_path_buf(),
            _tmp: None,
        };
        s.spawn_on_free_port()?;
        Ok(s)
    }

    fn spawn_on_free_port(&mut self) -> std::io::Result<()> {
        let mut last = None;
        // Another process may take the port between probing and binding: try a few.
        for _ in 0..5 {
            self.port = free_port()?;
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("redis-server did not start")))
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))?;
        let child = Command::new(redis_server_binary())
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot run {}: {e} (install redis-server, or set BIMIP_REDIS_SERVER)",
                        redis_server_binary().display()
                    ),
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(std::io::Error::other(format!(
                    "redis-server exited at start ({status}); see {}",
                    self.dir.join("redis.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(std::io::Error::other(
            "redis-server did not answer PING within 10 s",
        ))
    }

    /// Whether the server answers `PING` (also true while it is still loading its AOF).
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.port).into(),
            Duration::from_millis(200),
        ) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The folder with the AOF and `redis.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// SIGKILL: an outage (the AOF keeps what was fsynced).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and folder (replaying the AOF).
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                // The port may linger for a moment after the kill.
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "redis-server restart, retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The process id (to pause it with SIGSTOP, say).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
