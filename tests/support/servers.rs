//! Private servers for fault tests, which stop and restart them: a Postgres cluster
//! (`initdb` + `pg_ctl`, as the `postgres` user when the tests run as root) and a RabbitMQ node
//! (a second node beside the shared one, its own name, ports and data directory). The shared
//! servers on 5432 and 5672 are never touched. Each server lives in a temporary directory and
//! is killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn wait_port(port: u16, open: bool, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while port_open(port) != open {
        assert!(
            Instant::now() < deadline,
            "{what}: port {port} not {} after {timeout:?}",
            if open { "open" } else { "closed" }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn run(command: &mut Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A Postgres cluster of its own on a free port.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").is_file())
            .max()
            .expect("initdb");
        let dir = tempfile::tempdir().expect("temporary directory");
        if running_as_root() {
            // initdb refuses to run as root: the cluster belongs to `postgres`.
            run(
                Command::new("chown").arg("postgres").arg(dir.path()),
                "chown",
            );
        }
        let server = PrivatePostgres {
            bin,
            port: free_port(),
            dir,
        };
        run(
            server.command("initdb").arg("-D").arg(server.data()).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ]),
            "initdb",
        );
        server.start_again();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        command.stdin(Stdio::null());
        command
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
            self.port,
            self.dir.path().display()
        );
        run(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-o", &options, "-l"])
                .arg(self.dir.path().join("log"))
                .args(["-w", "start"]),
            "pg_ctl start",
        );
        wait_port(self.port, true, Duration::from_secs(30), "postgres");
    }

    /// Stops the server, cutting every connection (`pg_ctl stop -m fast`).
    pub fn stop(&self) {
        run(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "fast", "-w", "stop"]),
            "pg_ctl stop",
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A RabbitMQ node of its own (`sdxl-test-...@localhost`) on free ports.
pub struct PrivateRabbit {
    dir: tempfile::TempDir,
    child: Child,
    pub node: String,
    pub port: u16,
}

impl PrivateRabbit {
    /// Starts a node; with `consumer_timeout_ms`, deliveries unacknowledged that long are
    /// returned to their queue and their channel closed (checked twice a second).
    pub fn start(consumer_timeout_ms: Option<u64>) -> PrivateRabbit {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let dist_port = loop {
            let p = free_port();
            if p != port {
                break p;
            }
        };
        let node = format!("sdxl-test-{}@localhost", super::unique_name("rmq"));
        let mut conf = format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n");
        let mut advanced = "[].".to_owned();
        if let Some(timeout) = consumer_timeout_ms {
            conf.push_str(&format!("consumer_timeout = {timeout}\n"));
            advanced = "[{rabbit, [{channel_tick_interval, 500}]}].".to_owned();
        }
        let path = dir.path();
        std::fs::write(path.join("rabbitmq.conf"), conf).unwrap();
        std::fs::write(path.join("advanced.config"), advanced).unwrap();
        std::fs::write(path.join("enabled_plugins"), "[].").unwrap();
        std::fs::write(path.join("env.conf"), "").unwrap();
        let cookie = path.join(".erlang.cookie");
        std::fs::write(&cookie, super::unique_name("cookie")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();

        let mut command = Command::new(rabbit_bin("rabbitmq-server"));
        set_env(&mut command, path, &node);
        command
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(path.join("server.out")).unwrap())
            .stderr(Stdio::null());
        let child = command.spawn().expect("start rabbitmq-server");
        let server = PrivateRabbit {
            dir,
            child,
            node,
            port,
        };
        wait_port(port, true, Duration::from_secs(90), "rabbitmq");
        server
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn ctl(&self, args: &[&str]) {
        let mut command = Command::new(rabbit_bin("rabbitmqctl"));
        set_env(&mut command, self.dir.path(), &self.node);
        command.arg("-n").arg(&self.node).args(args);
        run(&mut command, &format!("rabbitmqctl {}", args.join(" ")));
    }

    /// Name and opening time of every client connection (`rabbitmqctl list_connections`).
    pub fn connections(&self) -> Vec<String> {
        let mut command = Command::new(rabbit_bin("rabbitmqctl"));
        set_env(&mut command, self.dir.path(), &self.node);
        command.arg("-n").arg(&self.node).args([
            "list_connections",
            "name",
            "connected_at",
            "-q",
            "--no-table-headers",
        ]);
        let output = command.output().expect("rabbitmqctl");
        assert!(output.status.success(), "rabbitmqctl list_connections");
        let mut lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    /// Whether the node's log reports that it took back a delivery left unacknowledged past
    /// the consumer timeout (and closed the consumer's channel).
    pub fn logged_consumer_timeout(&self) -> bool {
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("log")) else {
            return false;
        };
        entries.flatten().any(|entry| {
            std::fs::read_to_string(entry.path()).is_ok_and(|text| {
                text.lines().any(|line| {
                    let line = line.to_ascii_lowercase();
                    line.contains("timed out") && line.contains("acknowledgement")
                })
            })
        })
    }

    /// `rabbitmqctl stop_app`: every connection is closed and the AMQP port shuts.
    pub fn stop_app(&self) {
        self.ctl(&["stop_app"]);
        wait_port(self.port, false, Duration::from_secs(30), "rabbitmq");
    }

    /// `rabbitmqctl start_app`, waiting for the AMQP port.
    pub fn start_app(&self) {
        self.ctl(&["start_app"]);
        wait_port(self.port, true, Duration::from_secs(60), "rabbitmq");
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        // The start script stops the Erlang VM on SIGTERM and then exits.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rabbit_bin(name: &str) -> PathBuf {
    // The scripts under /usr/lib/rabbitmq/bin run as the calling user; those in /usr/sbin
    // switch to the `rabbitmq` user, which could not read this node's files.
    let direct = Path::new("/usr/lib/rabbitmq/bin").join(name);
    if direct.is_file() {
        direct
    } else {
        PathBuf::from(name)
    }
}

fn set_env(command: &mut Command, dir: &Path, node: &str) {
    command
        .env("HOME", dir)
        .env("RABBITMQ_NODENAME", node)
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
        .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .env("RABBITMQ_CONF_ENV_FILE", dir.join("env.conf"))
        .env("ERL_EPMD_ADDRESS", "127.0.0.1");
}
