//! `storm`: N reconnecting clients (edgegate-client [`edgegate_client::Client`],
//! backoff + full jitter) spread over worker processes and source
//! addresses; once all are connected the gateway is drained (SIGTERM) or
//! killed (SIGKILL) and restarted, and everyone comes back.
//!
//! The harness either starts the gateway itself (`--gateway-cmd`, stopped
//! again at the end) or is given a pid to signal and a `--restart-cmd`.
//! Every `--sample-ms` it reads the workers' counts and the gateway's
//! `/metrics` (`edgegate_connections_accepted_total`, whose rise per
//! interval is the accept rate; a restart resets the counter).
//!
//! Recovery time = from the signal until every client has a new session
//! (as many welcomes since the signal as clients, and all alive).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

use crate::cli::{StormAction, StormArgs};
use crate::gateway::{Gateway, wait_ready};
use crate::procfs::{self, CpuMeter};
use crate::report::{Report, opt};
use crate::scenario::gateway_pid;
use crate::scenario::idle::{PER_WORKER, cpu_sum, worker_args};
use crate::series::{Chart, panel};

struct Worker {
    child: Child,
    stdin: ChildStdin,
    pid: u32,
}

/// Sums over the workers' latest progress lines.
#[derive(Clone, Copy, Debug, Default)]
struct Sums {
    alive: u64,
    connects: u64,
    ends: u64,
    fails: u64,
    stopped: u64,
    issued: u64,
}

fn sums(latest: &HashMap<usize, Value>) -> Sums {
    let mut s = Sums::default();
    for v in latest.values() {
        let g = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        s.alive += g("alive");
        s.connects += g("connects");
        s.ends += g("ends");
        s.fails += g("fails");
        s.stopped += g("stopped");
        s.issued += g("issued");
    }
    s
}

/// What the sampler learned, shared with the phase logic.
#[derive(Debug, Default)]
struct Shared {
    latest: HashMap<usize, Value>,
    done: HashMap<usize, Value>,
    chart: Chart,
    /// (t, accepted/s) per sample.
    accept_rates: Vec<(f64, f64)>,
    /// Baseline at the signal: t, sums.
    signal: Option<(f64, Sums)>,
    /// Reconnected count thresholds reached: t at ≥1, 50 %, 90 %, 99 %, all.
    marks: [Option<f64>; 5],
    first_down: Option<f64>,
    metrics_errors: u64,
}

const MARKS: [f64; 5] = [0.0, 0.5, 0.9, 0.99, 1.0];

/// Runs the scenario.
pub async fn run(a: StormArgs) -> Result<Report> {
    let c = &a.common;
    let n = a.clients;
    if a.gateway_cmd.is_none() && a.restart_cmd.is_none() {
        eprintln!(
            "storm: neither --gateway-cmd nor --restart-cmd: the harness only signals the gateway; \
             the clients come back only if something else restarts it"
        );
    }
    let workers = a
        .workers
        .unwrap_or_else(|| n.div_ceil(PER_WORKER).max(1) as u32)
        .max(1);
    let per = n.div_ceil(u64::from(workers));
    if let Some(limit) = procfs::open_files_limit()
        && per + 64 > limit
    {
        bail!("{per} clients per worker exceeds the open-files limit {limit}: use more --workers");
    }
    let target = c.target();
    let admin = c.admin.clone();
    if admin.is_none() {
        eprintln!("storm: no --admin: the gateway's accept rate is not measured");
    }
    let t_run = Instant::now();
    let shared = Arc::new(Mutex::new(Shared {
        chart: Chart::new(t_run),
        ..Shared::default()
    }));

    // The gateway.
    let mut gw = Gateway::new(
        a.gateway_cmd.clone(),
        &a.gateway_env,
        a.gateway_log.clone(),
        None,
    )?;
    if gw.can_start() {
        gw.start_ready(&target, admin.as_deref(), Duration::from_secs(15))
            .await?;
    } else {
        let pid = gateway_pid(c.gateway_pid)
            .context("storm needs --gateway-cmd, or a gateway pid (--gateway-pid)")?;
        gw = Gateway::new(
            a.restart_cmd.clone(),
            &a.gateway_env,
            a.gateway_log.clone(),
            Some(pid),
        )?;
    }
    let first_pid = gw.pid();

    // Workers.
    let max_life = a.recover_secs
        + a.exit_timeout_secs
        + 2.0 * n as f64 / a.rate.max(1.0)
        + a.settle_secs
        + a.hold_secs
        + 120.0;
    let exe = std::env::current_exe().context("current_exe")?;
    let mut ws: Vec<Worker> = Vec::new();
    let mut remaining = n;
    let me_cpu = CpuMeter::start(None);
    for i in 0..workers {
        let share = per.min(remaining);
        remaining -= share;
        let rate = a.rate * share as f64 / n.max(1) as f64;
        let mut cmd = Command::new(&exe);
        cmd.arg("storm-worker")
            .args(worker_args(c))
            .args(["--index", &i.to_string()])
            .args(["--clients", &share.to_string()])
            .args(["--rate", &rate.to_string()])
            .args(["--backoff-base-ms", &a.backoff_base_ms.to_string()])
            .args(["--backoff-cap-ms", &a.backoff_cap_ms.to_string()])
            .args(["--report-ms", &a.sample_ms.to_string()])
            .args(["--max-life-secs", &max_life.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(m) = a.max_attempts {
            cmd.args(["--max-attempts", &m.to_string()]);
        }
        let mut child = cmd.spawn().context("spawn storm worker")?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take().context("worker stdout")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let sh = shared.clone();
        let idx = i as usize;
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&l) else {
                    continue;
                };
                let Ok(mut g) = sh.lock() else { break };
                if v["ev"] == "done" {
                    g.done.insert(idx, v);
                } else {
                    // Reconnect downtime of this interval, for the latency panel.
                    if v["dt_n"].as_u64().unwrap_or(0) > 0 {
                        let name = |p: &str| format!("reconnect downtime {p} (w{idx})");
                        for (k, p) in [("dt_p50", "p50"), ("dt_p99", "p99")] {
                            if let Some(x) = v[k].as_f64() {
                                g.chart.push(panel::LATENCY, &name(p), x);
                            }
                        }
                    }
                    g.latest.insert(idx, v);
                }
            }
        });
        ws.push(Worker { child, stdin, pid });
    }
    let pids: Vec<u32> = ws.iter().map(|w| w.pid).collect();

    // Sampler: worker sums + /metrics every sample_ms.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sampler = {
        let sh = shared.clone();
        let admin = admin.clone();
        let period = Duration::from_millis(a.sample_ms.max(20));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut prev: Option<(f64, f64)> = None;
            let mut last_fail: Option<f64> = None;
            loop {
                tick.tick().await;
                if *stop_rx.borrow() {
                    break;
                }
                let m = match &admin {
                    Some(ad) => match tokio::time::timeout(
                        Duration::from_millis(300),
                        crate::admin::get(ad, "/metrics"),
                    )
                    .await
                    {
                        Ok(Ok((200, body))) => Some(body),
                        _ => None,
                    },
                    None => None,
                };
                let Ok(mut g) = sh.lock() else { break };
                let t = g.chart.now();
                let s = sums(&g.latest);
                g.chart.push_at(
                    panel::CONNECTIONS,
                    "clients connected (harness)",
                    t,
                    s.alive as f64,
                );
                match &m {
                    Some(body) => {
                        if let Some(open) = crate::admin::metric_sum(body, "edgegate_connections") {
                            g.chart.push_at(
                                panel::CONNECTIONS,
                                "gateway connections (/metrics)",
                                t,
                                open,
                            );
                        }
                        if let Some(acc) =
                            crate::admin::metric_sum(body, "edgegate_connections_accepted_total")
                        {
                            if let Some((pt, pa)) = prev {
                                // A restarted gateway starts its counter at 0,
                                // no earlier than the last failed sample.
                                let (d, since) = if acc >= pa {
                                    (acc - pa, pt)
                                } else {
                                    (acc, last_fail.unwrap_or(pt).max(pt))
                                };
                                let rate = d / (t - since).max(1e-3);
                                g.chart.push_at(panel::ACCEPTS, "accepted / s", t, rate);
                                g.accept_rates.push((t, rate));
                            }
                            prev = Some((t, acc));
                        }
                    }
                    None if admin.is_some() => {
                        g.metrics_errors += 1;
                        last_fail = Some(t);
                    }
                    None => {}
                }
                if let Some((_, base)) = g.signal {
                    if g.first_down.is_none() && s.alive < n {
                        g.first_down = Some(t);
                    }
                    let back = s.connects.saturating_sub(base.connects);
                    for (i, frac) in MARKS.iter().enumerate() {
                        let need = ((*frac * n as f64).ceil() as u64).max(1);
                        let ok = if i == MARKS.len() - 1 {
                            back >= n && s.alive >= n
                        } else {
                            back >= need
                        };
                        if ok && g.marks[i].is_none() {
                            g.marks[i] = Some(t);
                        }
                    }
                }
            }
        })
    };

    // Ramp.
    let pb = crate::peer::bar(c.quiet, n, "connect");
    let ramp_limit = Duration::from_secs_f64(2.0 * n as f64 / a.rate.max(1.0) + 15.0);
    let t_ramp = Instant::now();
    loop {
        let s = shared.lock().map(|g| sums(&g.latest)).unwrap_or_default();
        pb.set_position(s.alive);
        pb.set_message(format!("fails {} stopped {}", s.fails, s.stopped));
        if s.alive >= n {
            break;
        }
        if t_ramp.elapsed() > ramp_limit {
            pb.finish_and_clear();
            shutdown(&mut ws, &mut gw, &stop_tx).await;
            bail!(
                "ramp: only {} of {n} clients connected within {ramp_limit:?} (fails {})",
                s.alive,
                s.fails
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pb.finish_and_clear();
    let ramp_secs = t_ramp.elapsed().as_secs_f64();
    let ramp_sums = shared.lock().map(|g| sums(&g.latest)).unwrap_or_default();
    tokio::time::sleep(Duration::from_secs_f64(a.settle_secs)).await;

    // The disruption.
    let harness_cpu0 = me_cpu.cpu_secs().unwrap_or(0.0) + cpu_sum(&pids);
    let t_signal = {
        let mut g = shared.lock().map_err(|_| anyhow::anyhow!("lock"))?;
        let t = g.chart.now();
        let s = sums(&g.latest);
        g.signal = Some((t, s));
        g.chart.mark(&format!("SIG{}", a.action.signal()));
        t
    };
    let t0 = Instant::now();
    gw.signal(a.action.signal())?;
    let pb = crate::peer::bar(c.quiet, n, "storm");
    let exit_status = gw
        .wait_exit(Duration::from_secs_f64(a.exit_timeout_secs))
        .await;
    let exit_secs = t0.elapsed().as_secs_f64();
    if let Ok(mut g) = shared.lock() {
        g.chart.mark("exited");
    }
    let mut restart_secs: Option<f64> = None;
    let mut restart_attempts = 0u32;
    let mut ready_secs = None;
    let mut new_cpu: Option<CpuMeter> = None;
    if exit_status.is_none() {
        eprintln!(
            "storm: the gateway did not exit within {} s of SIG{}",
            a.exit_timeout_secs,
            a.action.signal()
        );
    } else if gw.can_start() {
        tokio::time::sleep(Duration::from_secs_f64(a.restart_delay_secs)).await;
        // Like a supervisor: a gateway that exits at once (e.g. its old
        // sockets are still being torn down) is started again after 250 ms.
        let limit = Duration::from_secs_f64(a.recover_secs);
        while ready_secs.is_none() && t0.elapsed() < limit {
            let pid = gw.start()?;
            restart_attempts += 1;
            restart_secs.get_or_insert(t0.elapsed().as_secs_f64());
            new_cpu = Some(CpuMeter::start(Some(pid)));
            if let Ok(mut g) = shared.lock() {
                g.chart.mark(if restart_attempts == 1 {
                    "restart"
                } else {
                    "restart again"
                });
            }
            while t0.elapsed() < limit && gw.alive() {
                if wait_ready(&target, admin.as_deref(), Duration::from_millis(50))
                    .await
                    .is_some()
                {
                    ready_secs = Some(t0.elapsed().as_secs_f64());
                    if let Ok(mut g) = shared.lock() {
                        g.chart.mark("ready");
                    }
                    break;
                }
            }
            if ready_secs.is_none() {
                let _ = gw.wait_exit(Duration::from_millis(100)).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    // Wait for everyone, bounded.
    let recover_limit = Duration::from_secs_f64(a.recover_secs);
    loop {
        let (s, all) = shared
            .lock()
            .map(|g| (sums(&g.latest), g.marks[4].is_some()))
            .unwrap_or_default();
        pb.set_position(s.connects.saturating_sub(ramp_sums.connects).min(n));
        pb.set_message(format!(
            "alive {} fails {} stopped {}",
            s.alive,
            s.fails.saturating_sub(ramp_sums.fails),
            s.stopped
        ));
        if all || t0.elapsed() > recover_limit || s.stopped >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pb.finish_and_clear();
    let waited = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(a.hold_secs)).await;
    let gw_recovery_cpu = new_cpu.and_then(|m| m.percent());
    let harness_cpu = me_cpu.cpu_secs().unwrap_or(0.0) + cpu_sum(&pids) - harness_cpu0;
    let harness_wall = t0.elapsed().as_secs_f64();
    let end_sums = shared.lock().map(|g| sums(&g.latest)).unwrap_or_default();
    let worker_rss: u64 = pids.iter().filter_map(|p| procfs::rss_kib(*p)).sum();

    // Close the clients, then the gateway if the harness started it.
    for w in &mut ws {
        let _ = w.stdin.write_all(b"close\n").await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && shared.lock().map(|g| g.done.len()).unwrap_or(ws.len()) < ws.len()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let _ = sampler.await;
    for w in &mut ws {
        if tokio::time::timeout(Duration::from_secs(5), w.child.wait())
            .await
            .is_err()
        {
            let _ = w.child.start_kill();
        }
    }
    let final_pid = gw.pid();
    let stopped_gateway = if a.gateway_cmd.is_some() && gw.alive() {
        let _ = gw.signal("TERM");
        gw.wait_exit(Duration::from_secs(30)).await.is_some()
    } else {
        gw.detach();
        false
    };

    // Results.
    let g = shared.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    let rel = |t: Option<f64>| t.map(|t| t - t_signal);
    let marks: Vec<Option<f64>> = g.marks.iter().map(|m| rel(*m)).collect();
    let recovered = marks[4];
    let after = |t: f64| t >= t_signal;
    let peak_accept = g
        .accept_rates
        .iter()
        .filter(|(t, _)| after(*t))
        .map(|p| p.1)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let peak_accept_ramp = g
        .accept_rates
        .iter()
        .filter(|(t, _)| !after(*t))
        .map(|p| p.1)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let mut fail_reasons: HashMap<String, u64> = HashMap::new();
    let mut end_reasons: HashMap<String, u64> = HashMap::new();
    let mut downtime = Vec::new();
    for v in g.done.values() {
        for (key, map) in [
            ("fail_reasons", &mut fail_reasons),
            ("end_reasons", &mut end_reasons),
        ] {
            if let Some(m) = v[key].as_object() {
                for (k, x) in m {
                    *map.entry(k.clone()).or_default() += x.as_u64().unwrap_or(0);
                }
            }
        }
        downtime.push(v["downtime"].clone());
    }
    let fails = end_sums.fails.saturating_sub(ramp_sums.fails);
    let ramp_fails = ramp_sums.fails;
    let reconnects = end_sums.connects.saturating_sub(ramp_sums.connects);
    let not_back = n.saturating_sub(end_sums.alive);
    let dt = |k: &str| {
        downtime
            .iter()
            .filter_map(|d| d.get(k).and_then(Value::as_f64))
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
    };
    let env_json: Value = a
        .gateway_env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), Value::from(v)))
        .collect::<serde_json::Map<_, _>>()
        .into();

    let mut r = Report::new(
        "storm",
        json!({
            "clients": n, "rate": a.rate, "workers": workers, "action": format!("{:?}", a.action).to_lowercase(),
            "transport": c.transport_label(), "tls": c.tls || c.transport == crate::Transport::Quic, "encoding": c.encoding().name(), "target": target,
            "source_ips": c.source_ips, "gateway_cmd": a.gateway_cmd, "restart_cmd": a.restart_cmd,
            "gateway_env": env_json, "backoff_base_ms": a.backoff_base_ms,
            "backoff_cap_ms": a.backoff_cap_ms, "max_attempts": a.max_attempts,
            "restart_delay_secs": a.restart_delay_secs, "sample_ms": a.sample_ms,
        }),
    );
    r.set("ramp_secs", ramp_secs);
    r.set("ramp_fails", ramp_fails);
    r.set("gateway_pid_before", first_pid);
    r.set("gateway_pid_after", final_pid);
    r.set("gateway_exit", exit_status.clone());
    r.set("exit_secs", exit_secs);
    r.set("restart_secs", restart_secs);
    r.set("ready_secs", ready_secs);
    r.set("restart_attempts", restart_attempts);
    r.set("first_disconnect_secs", rel(g.first_down));
    r.set("first_back_secs", marks[0]);
    r.set("back_50pct_secs", marks[1]);
    r.set("back_90pct_secs", marks[2]);
    r.set("back_99pct_secs", marks[3]);
    r.set("recovery_secs", recovered);
    r.set(
        "recovery_after_ready_secs",
        recovered.zip(ready_secs).map(|(a, b)| a - b),
    );
    r.set("waited_secs", waited);
    r.set("reconnects", reconnects);
    r.set("reconnect_failures", fails);
    r.set("failure_reasons", json!(fail_reasons));
    r.set("session_end_reasons", json!(end_reasons));
    r.set("stopped_clients", end_sums.stopped);
    r.set("not_back", not_back);
    r.set("downtime_per_worker", json!(downtime));
    r.set("peak_accept_rate", peak_accept);
    r.set("peak_accept_rate_ramp", peak_accept_ramp);
    r.set("metrics_unreachable_samples", g.metrics_errors);
    r.set("gateway_cpu_recovery_pct", gw_recovery_cpu);
    r.set("harness_cpu_storm_pct", 100.0 * harness_cpu / harness_wall);
    r.set("harness_workers_rss_kib", worker_rss);
    r.set("gateway_stopped_at_end", stopped_gateway);
    r.set("gateway_log", gw.log_path().display().to_string());

    let f = |x: Option<f64>| opt(x, 2, " s");
    r.row(
        "transport / encoding",
        format!("{} / {}", c.transport_label(), c.encoding().name()),
    );
    r.row(
        "clients",
        format!(
            "{n} over {workers} worker(s), ramp {ramp_secs:.2} s ({ramp_fails} failed attempts)"
        ),
    );
    r.row(
        "action",
        format!(
            "SIG{} pid {} → exit after {exit_secs:.2} s ({}){}",
            a.action.signal(),
            first_pid.map_or("?".into(), |p| p.to_string()),
            exit_status.as_deref().unwrap_or("did not exit"),
            match (restart_secs, ready_secs) {
                (Some(s), Some(rd)) => format!(
                    ", restarted at {s:.2} s ({restart_attempts} start(s)), ready at {rd:.2} s"
                ),
                (Some(s), None) => format!(", restarted at {s:.2} s, never ready"),
                _ => ", not restarted by the harness".into(),
            }
        ),
    );
    r.row(
        "back (from signal)",
        format!(
            "first {}  50% {}  90% {}  99% {}  all {}",
            f(marks[0]),
            f(marks[1]),
            f(marks[2]),
            f(marks[3]),
            f(recovered)
        ),
    );
    r.row(
        "recovery time",
        match recovered {
            Some(t) => format!(
                "{t:.2} s from the signal{} (±{} ms sampling)",
                ready_secs.map_or(String::new(), |rd| format!(
                    ", {:.2} s after the new gateway was ready",
                    t - rd
                )),
                2 * a.sample_ms
            ),
            None => format!(
                "NOT all back within {} s: {not_back} missing",
                a.recover_secs
            ),
        },
    );
    r.row(
        "reconnects / failures",
        format!(
            "{reconnects} reconnects, {fails} failed attempts {fail_reasons:?}, {} stopped",
            end_sums.stopped
        ),
    );
    r.row("sessions ended by", format!("{end_reasons:?}"));
    r.row(
        "client downtime",
        format!(
            "p50 ≤ {}  p99 ≤ {}  max {} (worst worker)",
            opt(dt("p50_ms"), 0, " ms"),
            opt(dt("p99_ms"), 0, " ms"),
            opt(dt("max_ms"), 0, " ms")
        ),
    );
    r.row(
        "peak accept rate",
        format!(
            "{} after the signal ({} during the ramp), from /metrics every {} ms",
            opt(peak_accept, 0, "/s"),
            opt(peak_accept_ramp, 0, "/s"),
            a.sample_ms
        ),
    );
    r.row(
        "gateway CPU (new process)",
        opt(gw_recovery_cpu, 1, " % of one core from restart to the end"),
    );
    r.row(
        "harness CPU",
        format!(
            "{:.1} % of one core from the signal (parent + workers); workers RSS {worker_rss} KiB",
            100.0 * harness_cpu / harness_wall
        ),
    );
    let chart = g.chart.clone();
    drop(g);
    r.set_chart(chart);
    Ok(r)
}

async fn shutdown(ws: &mut [Worker], gw: &mut Gateway, stop: &tokio::sync::watch::Sender<bool>) {
    let _ = stop.send(true);
    for w in ws.iter_mut() {
        let _ = w.stdin.write_all(b"close\n").await;
        let _ = w.child.start_kill();
    }
    if gw.started_here && gw.alive() {
        let _ = gw.signal("TERM");
        let _ = gw.wait_exit(Duration::from_secs(30)).await;
    }
}

impl StormAction {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            StormAction::Drain => "drain",
            StormAction::Kill => "kill",
        }
    }
}
