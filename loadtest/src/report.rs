//! Results: a JSON document and a human summary table.

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use serde_json::{Map, Value, json};

/// A scenario's results.
#[derive(Debug)]
pub struct Report {
    json: Map<String, Value>,
    rows: Vec<(String, String)>,
    chart: Option<crate::series::Chart>,
}

impl Report {
    /// A report for `scenario` run with `params`; records the machine.
    pub fn new(scenario: &str, params: Value) -> Report {
        let mut json = Map::new();
        json.insert("scenario".into(), scenario.into());
        json.insert("params".into(), params);
        json.insert("machine".into(), machine());
        Report {
            json,
            rows: Vec::new(),
            chart: None,
        }
    }

    /// Attaches the run's time series (JSON field `timeseries`, and the `--svg` chart).
    pub fn set_chart(&mut self, chart: crate::series::Chart) {
        self.json.insert("timeseries".into(), chart.to_json());
        self.chart = Some(chart);
    }

    /// The SVG chart of the time series (empty panels when none were recorded).
    pub fn svg(&self) -> String {
        let scenario = self
            .json
            .get("scenario")
            .and_then(Value::as_str)
            .unwrap_or("");
        let params = self
            .json
            .get("params")
            .map(|p| p.to_string())
            .unwrap_or_default();
        let m = self.json.get("machine").cloned().unwrap_or(Value::Null);
        let sub = format!(
            "{} CPUs ({}), load {} at start; the gateway and the harness share these CPUs\n{}",
            m["cpus"],
            m["cpu_model"].as_str().unwrap_or(""),
            m["loadavg_at_start"].as_str().unwrap_or(""),
            params.chars().take(140).collect::<String>()
        );
        let empty = crate::series::Chart::default();
        crate::svg::render(
            self.chart.as_ref().unwrap_or(&empty),
            &format!("loadtest {scenario}"),
            &sub,
        )
    }

    /// Sets a JSON field.
    pub fn set(&mut self, key: &str, v: impl Into<Value>) {
        self.json.insert(key.into(), v.into());
    }

    /// Adds a table row.
    pub fn row(&mut self, label: &str, text: impl Into<String>) {
        self.rows.push((label.into(), text.into()));
    }

    /// The JSON document.
    pub fn to_json(&self) -> Value {
        Value::Object(self.json.clone())
    }

    /// The table as text.
    pub fn table(&self) -> String {
        let w = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let mut s = String::new();
        let title = format!(
            "loadtest {}",
            self.json
                .get("scenario")
                .and_then(Value::as_str)
                .unwrap_or("")
        );
        s.push_str(&title);
        s.push('\n');
        s.push_str(&"-".repeat(w + 40));
        s.push('\n');
        for (l, v) in &self.rows {
            s.push_str(&format!("{l:<w$}  {v}\n"));
        }
        s
    }

    /// Prints the table to stdout and writes the JSON and the SVG chart where asked.
    pub fn emit(&self, json_path: Option<&Path>, svg_path: Option<&Path>) -> Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(self.table().as_bytes())?;
        if let Some(p) = svg_path {
            std::fs::write(p, self.svg())?;
            writeln!(out, "SVG chart: {}", p.display())?;
        }
        match json_path {
            Some(p) if p == Path::new("-") => {
                writeln!(out, "{}", serde_json::to_string_pretty(&self.to_json())?)?;
            }
            Some(p) => {
                std::fs::write(p, serde_json::to_string_pretty(&self.to_json())? + "\n")?;
                writeln!(out, "JSON report: {}", p.display())?;
            }
            None => {}
        }
        Ok(())
    }
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    json!({ "cpus": cpus, "cpu_model": model, "kernel": kernel, "mem_kib": mem_kib,
            "loadavg_at_start": loadavg })
}

/// Formats an optional float with `prec` decimals, "n/a" when absent.
pub fn opt(v: Option<f64>, prec: usize, unit: &str) -> String {
    match v {
        Some(v) => format!("{v:.prec$}{unit}"),
        None => "n/a".into(),
    }
}

/// One-line latency summary from [`crate::track::summary`] output.
pub fn latency_line(s: &Value) -> String {
    let g = |k: &str| s.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    format!(
        "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  (n={})",
        g("p50_ms"),
        g("p90_ms"),
        g("p99_ms"),
        g("p999_ms"),
        g("max_ms"),
        s.get("count").and_then(Value::as_u64).unwrap_or(0)
    )
}
