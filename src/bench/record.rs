//! Measurements: latency samples, their percentiles, and the JSON lines the
//! benchmark prints (one measured figure per line).

use std::io::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which direction is better for a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Latencies, times, memory.
    Lower,
    /// Throughput.
    Higher,
    /// Counts and checks: not compared.
    None,
}

/// One figure, printed as one JSON line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Who was measured (`cowsnap`, `ctrd/btrfs`, ...).
    pub label: String,
    /// The workload (`cycles`, `chain`, ...).
    pub workload: String,
    /// The figure inside the workload (`prepare.p50`, ...).
    pub metric: String,
    /// The value, in `unit`.
    pub value: f64,
    /// `ms`, `s`, `ops/s`, `bytes`, `MiB`, `%`, `count`.
    pub unit: String,
    /// Which direction is better.
    pub better: Better,
    /// How many samples the figure summarizes.
    #[serde(default)]
    pub samples: u64,
}

/// Latency samples of one operation.
#[derive(Default, Clone)]
pub struct Samples(Vec<Duration>);

impl Samples {
    /// Adds one sample.
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    /// Adds all of another's samples.
    pub fn extend(&mut self, other: &Samples) {
        self.0.extend_from_slice(&other.0);
    }

    /// How many samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `p`-th percentile (0..=100), nearest rank, in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut v = self.0.clone();
        v.sort_unstable();
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        ms(v[rank.clamp(1, v.len()) - 1])
    }

    /// The sum, in milliseconds.
    pub fn total_ms(&self) -> f64 {
        self.0.iter().map(|d| ms(*d)).sum()
    }
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Collects a run's records: prints each as a JSON line on stdout as it is
/// made, and keeps them for the closing table.
pub struct Emitter {
    label: String,
    records: Vec<Record>,
}

impl Emitter {
    /// Records for `label`.
    pub fn new(label: &str) -> Emitter {
        Emitter {
            label: label.to_owned(),
            records: Vec::new(),
        }
    }

    /// Emits one figure.
    pub fn emit(
        &mut self,
        workload: &str,
        metric: &str,
        value: f64,
        unit: &str,
        better: Better,
        samples: usize,
    ) {
        let r = Record {
            label: self.label.clone(),
            workload: workload.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
            better,
            samples: samples as u64,
        };
        if let Ok(line) = serde_json::to_string(&r) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        eprintln!(
            "bench [{}] {workload} {metric} = {} {unit}",
            self.label,
            fmt_value(value)
        );
        self.records.push(r);
    }

    /// Emits p50 and p99 (in ms) of `samples` as `<op>.p50` and `<op>.p99`.
    pub fn latency(&mut self, workload: &str, op: &str, samples: &Samples) {
        let n = samples.len();
        self.emit(
            workload,
            &format!("{op}.p50"),
            samples.percentile_ms(50.0),
            "ms",
            Better::Lower,
            n,
        );
        self.emit(
            workload,
            &format!("{op}.p99"),
            samples.percentile_ms(99.0),
            "ms",
            Better::Lower,
            n,
        );
    }

    /// Everything emitted so far.
    pub fn records(&self) -> &[Record] {
        &self.records
    }
}

/// A value with about four significant digits, no exponent.
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 1000.0 || (v == v.trunc() && a < 1e15) {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.5}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut s = Samples::default();
        for i in 1..=100 {
            s.push(Duration::from_millis(i));
        }
        assert_eq!(s.percentile_ms(50.0), 50.0);
        assert_eq!(s.percentile_ms(99.0), 99.0);
        assert_eq!(s.percentile_ms(100.0), 100.0);
        assert_eq!(s.percentile_ms(0.0), 1.0);
    }

    #[test]
    fn a_single_sample_is_every_percentile() {
        let mut s = Samples::default();
        s.push(Duration::from_millis(7));
        assert_eq!(s.percentile_ms(50.0), 7.0);
        assert_eq!(s.percentile_ms(99.0), 7.0);
    }

    #[test]
    fn records_round_trip_through_json() {
        let r = Record {
            label: "ctrd/btrfs".into(),
            workload: "cycles".into(),
            metric: "prepare.p50".into(),
            value: 1.5,
            unit: "ms".into(),
            better: Better::Lower,
            samples: 200,
        };
        let line = serde_json::to_string(&r).expect("serialize");
        let back: Record = serde_json::from_str(&line).expect("parse");
        assert_eq!(back.metric, "prepare.p50");
        assert_eq!(back.better, Better::Lower);
    }
}
