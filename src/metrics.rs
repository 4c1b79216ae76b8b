//! A small Prometheus text-format registry: counters, gauges and histograms with labels.
//!
//! Every part registers what it measures here; `/metrics` renders it. Kept tiny on
//! purpose: atomics on the hot path, one mutex only when a new label set first appears.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Histogram buckets in seconds, suited to HTTP requests and hook runs.
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Family {
    help: String,
    kind: Kind,
    series: BTreeMap<Labels, Arc<Series>>,
}

/// One labelled time series.
#[derive(Debug, Default)]
pub struct Series {
    value: AtomicU64,
    // Histogram only: cumulative bucket counts, sum (f64 bits) and count.
    buckets: Vec<AtomicU64>,
    sum_bits: AtomicU64,
    count: AtomicU64,
}

impl Series {
    /// Add to a counter.
    pub fn inc_by(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.inc_by(1);
    }
    /// Set a gauge.
    pub fn set(&self, v: u64) {
        self.value.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
    /// Record one histogram observation in seconds.
    pub fn observe(&self, secs: f64) {
        for (i, b) in DEFAULT_BUCKETS.iter().enumerate() {
            if secs <= *b {
                if let Some(c) = self.buckets.get(i) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + secs).to_bits();
            match self.sum_bits.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
    }
}

/// The registry. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Registry {
    families: Arc<Mutex<BTreeMap<String, Family>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn series(&self, name: &str, help: &str, kind: Kind, labels: &[(&str, &str)]) -> Arc<Series> {
        let key: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let Ok(mut fams) = self.families.lock() else {
            // A poisoned registry only loses metrics, never the call path.
            return Arc::new(Series::default());
        };
        let fam = fams.entry(name.to_string()).or_insert_with(|| Family {
            help: help.to_string(),
            kind,
            series: BTreeMap::new(),
        });
        fam.series
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Series {
                    buckets: if kind == Kind::Histogram {
                        DEFAULT_BUCKETS.iter().map(|_| AtomicU64::new(0)).collect()
                    } else {
                        Vec::new()
                    },
                    ..Series::default()
                })
            })
            .clone()
    }

    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Series> {
        self.series(name, help, Kind::Counter, labels)
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Series> {
        self.series(name, help, Kind::Gauge, labels)
    }

    pub fn histogram(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Series> {
        self.series(name, help, Kind::Histogram, labels)
    }

    /// Everything in Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(fams) = self.families.lock() else {
            return out;
        };
        for (name, fam) in fams.iter() {
            let kind = match fam.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {}", fam.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, s) in &fam.series {
                match fam.kind {
                    Kind::Counter | Kind::Gauge => {
                        let _ = writeln!(out, "{name}{} {}", fmt_labels(labels, None), s.get());
                    }
                    Kind::Histogram => {
                        for (i, b) in DEFAULT_BUCKETS.iter().enumerate() {
                            let c = s.buckets.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
                            let le = b.to_string();
                            let _ =
                                writeln!(out, "{name}_bucket{} {c}", fmt_labels(labels, Some(&le)));
                        }
                        let count = s.count.load(Ordering::Relaxed);
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {count}",
                            fmt_labels(labels, Some("+Inf"))
                        );
                        let sum = f64::from_bits(s.sum_bits.load(Ordering::Relaxed));
                        let _ = writeln!(out, "{name}_sum{} {sum}", fmt_labels(labels, None));
                        let _ = writeln!(out, "{name}_count{} {count}", fmt_labels(labels, None));
                    }
                }
            }
        }
        out
    }
}

fn fmt_labels(labels: &Labels, le: Option<&str>) -> String {
    if labels.is_empty() && le.is_none() {
        return String::new();
    }
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    format!("{{{}}}", parts.join(","))
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let r = Registry::new();
        r.counter("kolokol_ami_events_total", "AMI events", &[])
            .inc_by(3);
        let h = r.histogram(
            "kolokol_crm_request_seconds",
            "CRM latency",
            &[("crm", "kommo"), ("status", "200")],
        );
        h.observe(0.003);
        h.observe(2.0);
        let text = r.render();
        assert!(text.contains("kolokol_ami_events_total 3"), "{text}");
        assert!(text.contains(
            "kolokol_crm_request_seconds_bucket{crm=\"kommo\",status=\"200\",le=\"0.005\"} 1"
        ));
        assert!(text.contains("kolokol_crm_request_seconds_count{crm=\"kommo\",status=\"200\"} 2"));
    }
}
