//! Interleaved measurement, so that the figures of different variants are comparable on a
//! noisy host.
//!
//! Criterion measures one benchmark after another; on a shared machine the same query can
//! take 70 µs in one minute and 400 µs in the next, so two benchmarks measured a minute
//! apart say more about the minute than about the code. An [`Interleaver`] owns every
//! variant of a group and measures them in *rounds*: each round runs one batch of every
//! variant, in an order rotated by one place each round, and files each batch's time per
//! request (batch time / batch length, once per request of the batch) in that variant's
//! queue. When criterion's `iter_custom(iters)` asks for variant X, [`Interleaver::take`]
//! runs rounds until X's queue holds `iters` figures, then pops that many and returns
//! their sum (what is left over serves X's next call). Every figure criterion sees was
//! thus measured side by side with all the others.
//!
//! When criterion moves on to another variant, the figures that variant's queue gathered
//! meanwhile are dropped (they stay in the round records below): criterion plans its
//! iteration counts from the *wall* time of each `iter_custom` call, and figures served
//! at once from a full queue would make it believe requests cost nothing, ask for ever
//! more of them, and run for hours. Without them the wall time of a call is `iters` ×
//! (one request of every variant), so a benchmark takes about its configured warm-up and
//! measurement time, and a group `variants` times that.
//!
//! The interleaver also keeps every round's figures: [`Interleaver::table`] prints, per
//! variant, the median over rounds of its time per request and the median, p25 and p75 of
//! its per-round ratio to the baseline, each ratio taken between two batches of the same
//! round. A slow minute slows both sides of such a ratio alike, which is why it is the
//! figure to trust; criterion's own estimates (and its HTML plots) are right for each
//! variant's distribution, and comparable with each other for the same reason.
//!
//! The interleaver does not know about runtimes: it is given a function that runs one
//! batch of a variant and returns the time it took (a `block_on` on a current-thread
//! runtime for latency, a burst of tasks on a multi-thread runtime for contention).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

/// How [`Interleaver::table`] states a variant's cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)] // each bench uses one
pub enum Report {
    /// Time per request; ratio = variant / baseline (above 1 is slower).
    Latency,
    /// Requests per second; ratio = variant / baseline throughput (below 1 is slower).
    Throughput,
}

/// A set of named variants measured round-robin; see the module documentation.
///
/// `R` runs one batch: `run(variant, requests)` returns the time the batch took.
pub struct Interleaver<V, R> {
    names: Vec<String>,
    variants: Vec<V>,
    run: R,
    /// Requests per batch.
    batch: u64,
    /// Per variant: runs of `(ns per request, how many requests)` not yet handed out.
    queues: Vec<VecDeque<(f64, u64)>>,
    /// Per variant: how many requests its queue holds.
    queued: Vec<u64>,
    /// Per round, per variant: ns per request of that round's batch.
    rounds: Vec<Vec<f64>>,
    /// The variant criterion asked for last.
    current: Option<usize>,
    /// Whether every call of [`take`](Self::take) starts from an empty queue.
    fresh_per_call: bool,
}

impl<V, R> Interleaver<V, R>
where
    R: FnMut(&mut V, u64) -> Duration,
{
    /// An interleaver running batches of `batch` requests with `run`.
    pub fn new(batch: u64, run: R) -> Self {
        assert!(batch > 0, "a batch holds at least one request");
        Self {
            names: Vec::new(),
            variants: Vec::new(),
            run,
            batch,
            queues: Vec::new(),
            queued: Vec::new(),
            rounds: Vec::new(),
            current: None,
            fresh_per_call: false,
        }
    }

    /// Makes every call of [`take`](Self::take) draw on rounds of its own, never on the
    /// leftovers of the previous call. For runs of very few iterations (criterion's
    /// `--quick` takes two samples of 1 and 2 iterations): two samples cut from the same
    /// batch have the same time per iteration, and criterion's analysis fails on samples
    /// without any spread.
    pub fn fresh_per_call(mut self, fresh: bool) -> Self {
        self.fresh_per_call = fresh;
        self
    }

    /// Adds a variant; returns its index, for [`take`](Self::take).
    pub fn add(&mut self, name: &str, variant: V) -> usize {
        assert!(
            self.rounds.is_empty(),
            "variants are added before the first round"
        );
        self.names.push(name.to_owned());
        self.variants.push(variant);
        self.queues.push(VecDeque::new());
        self.queued.push(0);
        self.names.len() - 1
    }

    /// The variants' names, in the order they were added.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Each variant, mutably (e.g. for a check before measuring).
    pub fn variants_mut(&mut self) -> impl Iterator<Item = (&str, &mut V)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.variants.iter_mut())
    }

    /// Runs `rounds` rounds and forgets them (connections opened, caches filled).
    pub fn warm_up(&mut self, rounds: usize) {
        for _ in 0..rounds {
            self.round();
        }
        self.rounds.clear();
        for (queue, queued) in self.queues.iter_mut().zip(&mut self.queued) {
            queue.clear();
            *queued = 0;
        }
    }

    /// One round: a batch of every variant, starting one place further than the last
    /// round, each batch's time per request filed in its variant's queue and recorded.
    fn round(&mut self) {
        let n = self.variants.len();
        let first = self.rounds.len() % n;
        let mut figures = vec![0.0; n];
        for k in 0..n {
            let i = (first + k) % n;
            let elapsed = (self.run)(&mut self.variants[i], self.batch);
            let per_request = elapsed.as_nanos() as f64 / self.batch as f64;
            figures[i] = per_request;
            self.queues[i].push_back((per_request, self.batch));
            self.queued[i] += self.batch;
        }
        self.rounds.push(figures);
    }

    /// The total time of `iters` requests of variant `index`, all measured in rounds with
    /// every other variant: what criterion's `iter_custom` returns.
    pub fn take(&mut self, index: usize, iters: u64) -> Duration {
        if self.current != Some(index) || self.fresh_per_call {
            // A new benchmark: only figures measured from now on (see the module docs).
            self.current = Some(index);
            self.queues[index].clear();
            self.queued[index] = 0;
        }
        while self.queued[index] < iters {
            self.round();
        }
        let mut left = iters;
        let mut total_ns = 0.0;
        let queue = &mut self.queues[index];
        while left > 0 {
            let Some(front) = queue.front_mut() else {
                unreachable!("the queue was filled above");
            };
            let used = front.1.min(left);
            total_ns += front.0 * used as f64;
            front.1 -= used;
            left -= used;
            if front.1 == 0 {
                queue.pop_front();
            }
        }
        self.queued[index] -= iters;
        Duration::from_nanos(total_ns.round() as u64)
    }

    /// A markdown table of every variant against `baseline` (a name given to
    /// [`add`](Self::add)), from the rounds recorded so far; see [`Report`].
    pub fn table(&self, baseline: &str, report: Report) -> String {
        let Some(base) = self.names.iter().position(|n| n == baseline) else {
            return format!("(no variant named {baseline})\n");
        };
        let mut out = String::new();
        let what = match report {
            Report::Latency => "median per request",
            Report::Throughput => "requests/s (median round)",
        };
        let _ = writeln!(
            out,
            "| variant | {what} | ratio to {baseline}: median | p25 | p75 |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|");
        for (i, name) in self.names.iter().enumerate() {
            let mut own: Vec<f64> = self.rounds.iter().map(|r| r[i]).collect();
            let mut ratios: Vec<f64> = self
                .rounds
                .iter()
                .map(|r| match report {
                    Report::Latency => r[i] / r[base],
                    Report::Throughput => r[base] / r[i],
                })
                .collect();
            let median_ns = quantile(&mut own, 0.5);
            let figure = match report {
                Report::Latency => format_ns(median_ns),
                Report::Throughput => format!("{:.0}", 1e9 / median_ns),
            };
            let _ = writeln!(
                out,
                "| {name} | {figure} | {:.3}× | {:.3}× | {:.3}× |",
                quantile(&mut ratios, 0.5),
                quantile(&mut ratios, 0.25),
                quantile(&mut ratios, 0.75),
            );
        }
        let _ = writeln!(
            out,
            "\n{} rounds of {} requests per variant; each ratio is taken within one round.",
            self.rounds.len(),
            self.batch
        );
        out
    }
}

/// The `q` quantile of `values` (linear between the two nearest ranks); NaN if empty.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = q * (values.len() - 1) as f64;
    let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
    values[low] + (values[high] - values[low]) * (rank - low as f64)
}

/// `ns` as µs below a millisecond, as ms above.
fn format_ns(ns: f64) -> String {
    if ns < 1e6 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{:.3} ms", ns / 1e6)
    }
}
