//! `grant-usage`: Weir's plugin for the consumers the platform makes of applications' grants.
//! On a consumer, it names the grant to what answers the request (a function sees it as
//! `ctx.user.appId` and `grantId`) and counts the consumer's requests, errors (a status of 400
//! or more) and latency (until the response head is ready): as Prometheus series labelled with the consumer's name alone
//! (`weir_grant_requests_total`, `weir_grant_errors_total`, `weir_grant_duration_seconds`), and
//! per minute for [`usage`], which the platform's usage API reads.
//!
//! A consumer's counts belong to the plugin instances that hold them: a consumer that goes
//! takes its series with it, so names nobody granted never make one. The minutes kept are the
//! last [`RETENTION_MINUTES`], and at most [`MAX_MINUTES`] across every consumer (the oldest go
//! first), so memory stays bounded however many grants call. The counts are this process's:
//! each node counts what it served.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::{Factory, JsonSchema, Notes, Phases, Plugin, Reply, RequestCtx, ResponseCtx};

pub const NAME: &str = "grant-usage";

/// How long a consumer's per-minute counts are kept.
pub const RETENTION_MINUTES: u32 = 24 * 60;

/// The most per-minute counts kept across every consumer (about 90 bytes each).
pub const MAX_MINUTES: usize = 500_000;

/// Upper bounds of the latency buckets, in milliseconds; the last bucket is everything above.
const BOUNDS_MS: [f64; 17] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0];
const SLOTS: usize = BOUNDS_MS.len() + 1;

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, 25000, |c: Config, b| {
        let series = b.scope.strip_prefix("consumer:").map(series);
        Ok(Arc::new(GrantUsage { grantee: Arc::new(Grantee { application: c.application, grant: c.grant }), series }))
    })
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The application the consumer's grant belongs to.
    #[schemars(length(min = 1, max = 64))]
    application: String,
    /// The grant the consumer is.
    #[schemars(length(min = 1, max = 64))]
    grant: String,
}

/// The grant a request came under, noted for what answers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Grantee {
    pub application: String,
    pub grant: String,
}

/// The grant the request of `notes` came under, if its consumer is one.
pub fn grantee(notes: &Notes) -> Option<&Arc<Grantee>> {
    notes.get::<Arc<Grantee>>(NAME)
}

struct GrantUsage {
    grantee: Arc<Grantee>,
    /// The consumer's counts; none when the plugin is configured anywhere but on a consumer.
    series: Option<Arc<Series>>,
}

impl Plugin for GrantUsage {
    fn has_access(&self) -> bool {
        false
    }

    fn phases(&self) -> Phases {
        Phases { response: true, log: false, body: false }
    }

    fn rewrite(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        ctx.notes.put(NAME, self.grantee.clone());
        Ok(())
    }

    /// Counted when the response head is ready (a request's log record, and the wait for its
    /// body to be sent, would cost every call more than the count itself).
    fn header_filter(&self, ctx: &mut ResponseCtx<'_>) {
        if let Some(s) = &self.series {
            let now = Instant::now();
            s.observe(clock::minute(now), now.saturating_duration_since(ctx.started), ctx.parts.status.as_u16() >= 400);
        }
    }
}

/// One minute's counts of a consumer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Minute {
    /// Minutes since the Unix epoch.
    pub minute: u32,
    pub requests: u32,
    pub errors: u32,
    /// Requests per latency bucket ([`BOUNDS_MS`]).
    pub latency: [u32; SLOTS],
}

/// Minutes summed, in counts that do not wrap however many are summed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Total {
    pub requests: u64,
    pub errors: u64,
    pub latency: [u64; SLOTS],
}

impl Total {
    fn add(&mut self, m: &Minute) {
        self.requests += u64::from(m.requests);
        self.errors += u64::from(m.errors);
        for (a, b) in self.latency.iter_mut().zip(m.latency.iter()) {
            *a += u64::from(*b);
        }
    }

    /// The latency (ms) under which a share `q` of the requests finished, interpolated within
    /// its bucket as Prometheus's `histogram_quantile` does; none without requests.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut seen = 0.0;
        for (i, n) in self.latency.iter().enumerate() {
            let n = *n as f64;
            if n > 0.0 && seen + n >= rank {
                let low = if i == 0 { 0.0 } else { BOUNDS_MS[i - 1] };
                // Above the last bound there is nothing to interpolate towards.
                let Some(high) = BOUNDS_MS.get(i) else { return Some(low) };
                return Some(low + (high - low) * ((rank - seen) / n).clamp(0.0, 1.0));
            }
            seen += n;
        }
        Some(BOUNDS_MS[BOUNDS_MS.len() - 1])
    }
}

/// A consumer's counts: totals for Prometheus, and the last minutes.
#[derive(Default)]
pub struct Series {
    consumer: String,
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; SLOTS],
    /// Microseconds.
    sum: AtomicU64,
    minutes: Mutex<VecDeque<Minute>>,
}

impl Series {
    fn observe(&self, minute: u32, took: Duration, error: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let ms = took.as_secs_f64() * 1000.0;
        let slot = BOUNDS_MS.iter().position(|b| ms <= *b).unwrap_or(BOUNDS_MS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        let added = {
            let mut minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
            let added = minutes.back().is_none_or(|m| m.minute < minute);
            if added {
                minutes.push_back(Minute { minute, ..Minute::default() });
            }
            // A clock stepped back counts into the newest minute kept.
            let m = minutes.back_mut().expect("a minute was just made if none was");
            m.requests = m.requests.saturating_add(1);
            m.errors = m.errors.saturating_add(u32::from(error));
            m.latency[slot] = m.latency[slot].saturating_add(1);
            added
        };
        if added && HELD.fetch_add(1, Ordering::Relaxed) + 1 > MAX_MINUTES {
            trim(minute);
        } else if added && PRUNED.load(Ordering::Relaxed) < minute.saturating_sub(60) {
            // Once an hour at most, minutes past the retention go.
            trim(minute);
        }
    }
}

/// Per-minute counts kept across every consumer.
static HELD: AtomicUsize = AtomicUsize::new(0);
/// The minute of the last trim.
static PRUNED: AtomicU32 = AtomicU32::new(0);

fn all() -> &'static Mutex<BTreeMap<String, Weak<Series>>> {
    static ALL: OnceLock<Mutex<BTreeMap<String, Weak<Series>>>> = OnceLock::new();
    ALL.get_or_init(|| {
        crate::prometheus::add_source(render);
        Mutex::default()
    })
}

/// The minute of a monotonic instant, without a second clock read per request: the wall
/// clock is read when a minute has passed since it last was, so a step of it is followed
/// within a minute.
mod clock {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    /// The instant wall-clock times are reckoned from.
    fn base() -> Instant {
        static BASE: OnceLock<Instant> = OnceLock::new();
        *BASE.get_or_init(Instant::now)
    }

    /// Unix time of `base()` in milliseconds, as of the last reading; 0: none yet.
    static UNIX_AT_BASE_MS: AtomicU64 = AtomicU64::new(0);
    /// When it was read, in milliseconds since `base()`.
    static READ_AT_MS: AtomicU64 = AtomicU64::new(0);

    pub(super) fn minute(now: Instant) -> u32 {
        let since = now.saturating_duration_since(base()).as_millis() as u64;
        let mut at_base = UNIX_AT_BASE_MS.load(Ordering::Relaxed);
        if at_base == 0 || since.saturating_sub(READ_AT_MS.load(Ordering::Relaxed)) >= 60_000 {
            let fresh = Instant::now().saturating_duration_since(base()).as_millis() as u64;
            let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
            // At least 1: 0 means unread.
            at_base = unix.saturating_sub(fresh).max(1);
            UNIX_AT_BASE_MS.store(at_base, Ordering::Relaxed);
            READ_AT_MS.store(fresh, Ordering::Relaxed);
        }
        ((at_base + since) / 60_000) as u32
    }
}

/// The series of consumer `consumer`: the one its plugin instances hold, or a new one.
fn series(consumer: &str) -> Arc<Series> {
    let mut all = all().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = all.get(consumer).and_then(Weak::upgrade) {
        return s;
    }
    let s = Arc::new(Series { consumer: consumer.to_string(), ..Series::default() });
    all.insert(consumer.to_string(), Arc::downgrade(&s));
    s
}

/// Drops the minutes past the retention, then, while more than [`MAX_MINUTES`] are held, the
/// oldest minutes across every consumer until they fit.
fn trim(now: u32) {
    PRUNED.store(now, Ordering::Relaxed);
    let live: Vec<Arc<Series>> = {
        let mut all = all().lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|_, s| s.strong_count() > 0);
        all.values().filter_map(Weak::upgrade).collect()
    };
    let retained = now.saturating_sub(RETENTION_MINUTES);
    // How many are held of each minute, to find the oldest minute that may stay.
    let mut per_minute: BTreeMap<u32, usize> = BTreeMap::new();
    for s in &live {
        let minutes = s.minutes.lock().unwrap_or_else(|p| p.into_inner());
        for m in minutes.iter().filter(|m| m.minute >= retained) {
            *per_minute.entry(m.minute).or_default() += 1;
        }
    }
    let (cutoff, held) = cutoff(&per_minute, retained, MAX_MINUTES);
    for s in &live {
        let mut minutes = s.minutes.lock().unwrap_or_else(|p| p.into_inner());
        while minutes.front().is_some_and(|m| m.minute < cutoff) {
            minutes.pop_front();
        }
    }
    HELD.store(held, Ordering::Relaxed);
}

/// The oldest minute that may stay, at `from` or after, so that at most `max` minutes are
/// held of the counts `per_minute` (how many are held of each minute); and how many stay.
fn cutoff(per_minute: &BTreeMap<u32, usize>, from: u32, max: usize) -> (u32, usize) {
    let mut cutoff = from;
    let mut held: usize = per_minute.range(from..).map(|(_, n)| n).sum();
    for (minute, n) in per_minute.range(from..) {
        if held <= max {
            break;
        }
        held -= n;
        cutoff = minute + 1;
    }
    (cutoff, held)
}

/// Consumer `consumer`'s counts of the minutes in `from..to` (minutes since the epoch), oldest
/// first; none when this process holds nothing of it.
pub fn usage(consumer: &str, from: u32, to: u32) -> Vec<Minute> {
    let Some(s) = all().lock().unwrap_or_else(|p| p.into_inner()).get(consumer).and_then(Weak::upgrade) else {
        return Vec::new();
    };
    let minutes = s.minutes.lock().unwrap_or_else(|p| p.into_inner());
    minutes.iter().filter(|m| m.minute >= from && m.minute < to).cloned().collect()
}

/// Minutes `list` summed.
pub fn sum<'a>(list: impl IntoIterator<Item = &'a Minute>) -> Total {
    let mut out = Total::default();
    for m in list {
        out.add(m);
    }
    out
}

/// Appends the series to the metrics page.
fn render(out: &mut String) {
    let live: Vec<Arc<Series>> = {
        let mut all = all().lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|_, s| s.strong_count() > 0);
        all.values().filter_map(Weak::upgrade).collect()
    };
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let label = |s: &Series| format!("consumer=\"{}\"", crate::prometheus::label(&s.consumer));
    out.push_str("# HELP weir_grant_requests_total Requests of applications' grants, by consumer\n# TYPE weir_grant_requests_total counter\n");
    for s in &live {
        let _ = writeln!(out, "weir_grant_requests_total{{{}}} {}", label(s), n(&s.requests));
    }
    out.push_str("# HELP weir_grant_errors_total Responses of status 400 or more to applications' grants, by consumer\n# TYPE weir_grant_errors_total counter\n");
    for s in &live {
        let _ = writeln!(out, "weir_grant_errors_total{{{}}} {}", label(s), n(&s.errors));
    }
    out.push_str("# HELP weir_grant_duration_seconds Latency of applications' grants' requests, by consumer\n# TYPE weir_grant_duration_seconds histogram\n");
    for s in &live {
        let mut cumulative = 0;
        for (i, bucket) in s.buckets.iter().enumerate() {
            cumulative += n(bucket);
            let le = BOUNDS_MS.get(i).map_or("+Inf".to_string(), |b| (b / 1000.0).to_string());
            let _ = writeln!(out, "weir_grant_duration_seconds_bucket{{{},le=\"{le}\"}} {cumulative}", label(s));
        }
        let _ = writeln!(out, "weir_grant_duration_seconds_sum{{{}}} {}", label(s), n(&s.sum) as f64 / 1e6);
        let _ = writeln!(out, "weir_grant_duration_seconds_count{{{}}} {}", label(s), n(&s.requests));
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    fn minute_of(t: SystemTime) -> u32 {
        (t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 60) as u32
    }

    /// Held by the tests that use the process's series: a trim holds every series while it
    /// runs, so one test's trim would keep another's dropped series alive for that moment.
    fn registry() -> std::sync::MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[test]
    fn counts_by_minute_and_goes_with_its_holders() {
        let _serial = registry();
        // Minutes of now: a trim by another test keeps them.
        let m = minute_of(SystemTime::now());
        let s = series("gw-dev-app-test-usage");
        s.observe(m, Duration::from_micros(800), false);
        s.observe(m, Duration::from_millis(20), true);
        s.observe(m + 1, Duration::from_millis(3), false);
        let got = usage("gw-dev-app-test-usage", 0, u32::MAX);
        assert_eq!(got.iter().map(|x| (x.minute, x.requests, x.errors)).collect::<Vec<_>>(), [(m, 2, 1), (m + 1, 1, 0)]);
        assert_eq!(usage("gw-dev-app-test-usage", m + 1, m + 2).len(), 1, "the window's minutes only");
        let page = crate::prometheus::render();
        assert!(page.contains("weir_grant_requests_total{consumer=\"gw-dev-app-test-usage\"} 3"), "{page}");
        assert!(page.contains("weir_grant_errors_total{consumer=\"gw-dev-app-test-usage\"} 1"), "{page}");
        assert!(page.contains("weir_grant_duration_seconds_bucket{consumer=\"gw-dev-app-test-usage\",le=\"0.001\"} 1"), "{page}");
        assert!(page.contains("weir_grant_duration_seconds_count{consumer=\"gw-dev-app-test-usage\"} 3"), "{page}");
        drop(s);
        assert!(usage("gw-dev-app-test-usage", 0, u32::MAX).is_empty());
        assert!(!crate::prometheus::render().contains("gw-dev-app-test-usage"), "a consumer nobody holds has no series");
    }

    #[test]
    fn an_instant_falls_in_the_wall_clock_minute() {
        let now = Instant::now();
        let wall = minute_of(SystemTime::now());
        let m = clock::minute(now);
        assert!(m == wall || m + 1 == wall, "{m} against {wall}");
        let later = clock::minute(now + Duration::from_secs(120));
        assert!(later == m + 2 || later == m + 3, "two minutes on: {later} against {m}");
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let mut m = Total::default();
        assert_eq!(m.quantile_ms(0.5), None);
        // 100 requests between 1 and 2.5 ms.
        m.latency[4] = 100;
        m.requests = 100;
        let p50 = m.quantile_ms(0.5).unwrap();
        assert!((p50 - 1.75).abs() < 1e-9, "{p50}");
        let p99 = m.quantile_ms(0.99).unwrap();
        assert!((p99 - 2.485).abs() < 1e-9, "{p99}");
        m.latency[SLOTS - 1] = 10_000;
        assert_eq!(m.quantile_ms(0.99), Some(30000.0), "past the last bound: the last bound");
        let minute = Minute { minute: 1, requests: u32::MAX, errors: 1, latency: [0; SLOTS] };
        let two = sum([&minute, &minute]);
        assert_eq!((two.requests, two.errors), (2 * u64::from(u32::MAX), 2), "sums do not wrap");
    }

    #[test]
    fn the_oldest_minutes_go_first_and_only_as_many_as_needed() {
        let held: BTreeMap<u32, usize> = [(10, 3), (11, 3), (12, 3)].into();
        assert_eq!(cutoff(&held, 0, 9), (0, 9));
        assert_eq!(cutoff(&held, 0, 6), (11, 6));
        assert_eq!(cutoff(&held, 0, 5), (12, 3));
        assert_eq!(cutoff(&held, 0, 0), (13, 0));
        assert_eq!(cutoff(&held, 11, 9), (11, 6), "what is past the retention is not counted");
    }

    #[test]
    fn old_minutes_go() {
        let _serial = registry();
        let now = minute_of(SystemTime::now());
        let s = series("gw-dev-app-test-trim");
        s.observe(now - RETENTION_MINUTES - 5, Duration::from_millis(1), false);
        s.observe(now, Duration::from_millis(1), false);
        trim(now);
        assert_eq!(usage("gw-dev-app-test-trim", 0, u32::MAX).iter().map(|m| m.minute).collect::<Vec<_>>(), [now]);
    }
}
