//! A real PostgreSQL server for tests: Debian's `postgresql` package, in a temporary data
//! directory, listening on a free port of 127.0.0.1 (and a unix socket in that directory),
//! with trust authentication.
//!
//! `PgServer::shared()` gives one server to every test of a binary that runs while another
//! holds it; each test takes a database of its own with `database()`. The server stops when
//! the last holder lets it go (SIGTERM to the postmaster, then a wait), and its directory is
//! removed. Should the test process die without that, a watchdog shell stops the server.
//!
//! As root (PostgreSQL refuses to run as root) the server runs as the `postgres` user the
//! package made, through `runuser`. `WEIR_PG_BIN` names the folder of `initdb` and `postgres`
//! when they are not under /usr/lib/postgresql/<version>/bin.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

pub struct PgServer {
    dir: Option<tempfile::TempDir>,
    port: u16,
    server: Child,
    watchdog: Option<Child>,
}

impl PgServer {
    /// The server every test of this binary shares while any holds it.
    pub fn shared() -> Arc<PgServer> {
        static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(server) = shared.upgrade() {
            return server;
        }
        let server = Arc::new(PgServer::start());
        *shared = Arc::downgrade(&server);
        server
    }

    /// Starts a server of its own.
    pub fn start() -> PgServer {
        let bin = bin_dir();
        let as_root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let dir = tempfile::Builder::new().prefix("weir-pg-").tempdir().expect("a temporary directory");
        if as_root {
            let status = Command::new("chown").arg("postgres:postgres").arg(dir.path()).status().expect("chown runs");
            assert!(status.success(), "the postgres user owns {}: is the postgresql package installed?", dir.path().display());
        }
        let data = dir.path().join("data");
        let out = command(as_root, &bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .expect("initdb runs");
        assert!(out.status.success(), "initdb failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let mut dir = dir;
        for tries in 1.. {
            let port = free_port();
            let log = dir.path().join(format!("server-{tries}.log"));
            let server = command(as_root, &bin.join("postgres"))
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
                .arg(dir.path())
                .args(["-c", "fsync=on", "-c", "max_connections=200"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("the server log"))
                .spawn()
                .expect("postgres starts");
            let mut pg = PgServer { dir: Some(dir), port, server, watchdog: None };
            let why = match pg.wait_ready() {
                Ok(()) => {
                    pg.watchdog = watchdog(pg.postmaster_pid(), pg.dir());
                    return pg;
                }
                Err(why) => why,
            };
            // Stopped, keeping the initialized directory for another port.
            pg.stop();
            dir = pg.dir.take().expect("the directory is kept until the server stops");
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(tries < 3 && said.contains("could not bind"), "PostgreSQL did not start ({why}):\n{said}");
        }
        unreachable!("the loop returns or fails")
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("the directory is kept until the server stops").path()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.server.try_wait() {
                return Err(format!("it exited: {status}"));
            }
            if Client::connect(&self.url("postgres"), NoTls).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("it did not accept connections within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The postmaster's PID, as it wrote it in its data directory (the child is `runuser`).
    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.as_ref()?.path().join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A client of the `postgres` database, to look at or change the server.
    pub fn admin(&self) -> Client {
        Client::connect(&self.url("postgres"), NoTls).expect("the test server accepts connections")
    }

    /// Makes a new database (named after `label` and a counter) and gives its URL.
    pub fn database(&self, label: &str) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let label: String = label.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(40).collect::<String>().to_ascii_lowercase();
        let name = format!("t{}_{label}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.admin().batch_execute(&format!("CREATE DATABASE \"{name}\"")).expect("CREATE DATABASE");
        self.url(&name)
    }

    /// SIGTERM to the postmaster, then a wait until it is gone. SIGTERM is PostgreSQL's smart
    /// shutdown, which waits for its clients to leave: one still connected after 10 s gets a
    /// SIGINT, the fast shutdown that ends their sessions.
    fn stop(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let Some(pid) = self.postmaster_pid() else {
            let _ = self.server.kill();
            let _ = self.server.wait();
            return;
        };
        for signal in ["-TERM", "-INT", "-QUIT"] {
            let _ = Command::new("kill").args([signal, &pid.to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !matches!(self.server.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.server.wait();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        drop(self.dir.take());
    }
}

/// The folder of the newest PostgreSQL's programs.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEIR_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("postgres").exists())
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!("PostgreSQL is not installed: apt-get install -y postgresql (or set WEIR_PG_BIN)"),
    }
}

fn command(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port on 127.0.0.1").port()
}

/// A shell that stops the server and removes its folder once this process is gone.
fn watchdog(pid: Option<u32>, dir: &Path) -> Option<Child> {
    let pid = pid?;
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -TERM {pid} 2>/dev/null; \
         while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; rm -rf '{dir}'",
        me = std::process::id(),
        dir = dir.display(),
    );
    Command::new("sh").args(["-c", &script]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()
}
