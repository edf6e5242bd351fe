//! Controlling a local gateway process for `storm`: start it from a command,
//! signal it, wait for it to exit, wait for it to be ready.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// A gateway the harness controls: started by it (`cmd`) or an external pid.
pub struct Gateway {
    cmd: Option<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    pid: Option<u32>,
    /// Whether the harness started the current process.
    pub started_here: bool,
}

impl Gateway {
    /// A gateway started with `cmd` (via `sh -c "exec CMD"`) and extra `env` (KEY=VALUE).
    pub fn new(
        cmd: Option<String>,
        env: &[String],
        log: Option<PathBuf>,
        pid: Option<u32>,
    ) -> Result<Gateway> {
        let env = env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| format!("--gateway-env {kv}: expected KEY=VALUE"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Gateway {
            cmd,
            env,
            log: log.unwrap_or_else(|| {
                PathBuf::from(format!("/tmp/loadtest-gateway-{}.log", std::process::id()))
            }),
            child: None,
            pid,
            started_here: false,
        })
    }

    /// The current gateway pid, if known.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Where a started gateway logs.
    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    /// True when a start command is known.
    pub fn can_start(&self) -> bool {
        self.cmd.is_some()
    }

    /// Starts the gateway with the command; returns its pid.
    pub fn start(&mut self) -> Result<u32> {
        let Some(cmd) = &self.cmd else {
            bail!("no command to start the gateway");
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let err = log.try_clone()?;
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!("exec {cmd}"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        let child = c.spawn().with_context(|| format!("start gateway: {cmd}"))?;
        let pid = child.id().context("gateway pid")?;
        self.child = Some(child);
        self.pid = Some(pid);
        self.started_here = true;
        Ok(pid)
    }

    /// Starts the gateway and waits up to `limit` for it to be ready
    /// ([`wait_ready`]); one that is not ready is killed and named with its log.
    pub async fn start_ready(
        &mut self,
        target: &str,
        admin: Option<&str>,
        limit: Duration,
    ) -> Result<u32> {
        let pid = self.start()?;
        if wait_ready(target, admin, limit).await.is_none() {
            let _ = self.signal("KILL");
            bail!(
                "the gateway (pid {pid}) did not become ready within {limit:?}; see {}",
                self.log_path().display()
            );
        }
        Ok(pid)
    }

    /// Sends `kill -<sig>` to the gateway.
    pub fn signal(&self, sig: &str) -> Result<()> {
        let Some(pid) = self.pid else {
            bail!("no gateway pid to signal (pass --gateway-pid or --gateway-cmd)");
        };
        let st = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .context("run kill")?;
        if !st.success() {
            bail!("kill -{sig} {pid} failed: {st}");
        }
        Ok(())
    }

    /// True while the gateway process exists (and is not a zombie).
    pub fn alive(&mut self) -> bool {
        if let Some(ch) = &mut self.child {
            return matches!(ch.try_wait(), Ok(None));
        }
        match self.pid {
            Some(pid) => match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Ok(s) => s
                    .rfind(')')
                    .and_then(|i| s[i + 1..].split_whitespace().next())
                    .is_some_and(|st| st != "Z" && st != "X"),
                Err(_) => false,
            },
            None => false,
        }
    }

    /// Waits up to `limit` for the gateway to exit; returns the exit status
    /// text when it did (`"exited"` for a process that is not our child).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<String> {
        let t0 = Instant::now();
        if let Some(ch) = &mut self.child {
            return match tokio::time::timeout(limit, ch.wait()).await {
                Ok(Ok(st)) => {
                    self.child = None;
                    Some(st.to_string())
                }
                _ => None,
            };
        }
        while t0.elapsed() < limit {
            if !self.alive() {
                return Some("exited".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Forgets the child without stopping it (it keeps running after the harness exits).
    pub fn detach(&mut self) {
        self.child = None;
    }
}

/// Polls until the gateway is ready (admin `/readyz` 200, or else a TCP
/// connect to `target` succeeds), up to `limit`; returns the time waited.
pub async fn wait_ready(target: &str, admin: Option<&str>, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let ok = match admin {
            Some(a) => matches!(
                tokio::time::timeout(Duration::from_millis(500), crate::admin::get(a, "/readyz"))
                    .await,
                Ok(Ok((200, _)))
            ),
            None => matches!(
                tokio::time::timeout(
                    Duration::from_millis(300),
                    tokio::net::TcpStream::connect(target)
                )
                .await,
                Ok(Ok(_))
            ),
        };
        if ok {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}
