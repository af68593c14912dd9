//! `GET /v1/applications/{appId}/usage?from=&to=&step=`: an application's requests, errors and
//! latency, in total and step by step, from the per-minute counts the `grant-usage` plugin
//! keeps of each grant's consumer on this node.

use http::StatusCode;
use schemars::JsonSchema;
use serde::Serialize;
use weir_plugins::grant_usage::{self, Minute};

use crate::Platform;
use crate::api::{Reply, bad_input, json};
use crate::grants::Application;
use crate::tokens::rfc3339;

/// The most points one answer has.
const MAX_POINTS: i64 = 10_000;

/// An application's usage in a window.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub app_id: String,
    /// RFC 3339, a whole minute.
    pub from: String,
    /// RFC 3339, a whole minute (the window ends before it).
    pub to: String,
    /// Seconds.
    pub step: i64,
    pub totals: Totals,
    /// Each grant's totals.
    pub grants: Vec<GrantUsage>,
    /// One point per step, from `from`.
    pub series: Vec<Point>,
}

#[derive(Serialize, JsonSchema)]
pub struct Totals {
    pub requests: u64,
    /// Responses of status 400 or more.
    pub errors: u64,
}

#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantUsage {
    pub grant_id: String,
    pub credential_id: String,
    pub gateway_id: String,
    pub environment: String,
    pub requests: u64,
    pub errors: u64,
}

#[derive(Serialize, JsonSchema, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    /// RFC 3339: where the step starts.
    pub time: String,
    pub requests: u64,
    pub errors: u64,
    /// Interpolated within latency buckets; null without requests.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// The window and step a usage query asks for, in Unix seconds: `from` and `to` are whole
/// minutes, `step` a whole number of minutes.
#[derive(Debug, PartialEq)]
pub(crate) struct Window {
    pub from: i64,
    pub to: i64,
    pub step: i64,
}

/// Reads `from` and `to` (RFC 3339; by default the last hour) and `step` (seconds, a multiple
/// of 60; by default 60) of a usage query.
pub(crate) fn window(query: Option<&str>, now: i64) -> Result<Window, Vec<String>> {
    let param = |k: &str| query.and_then(|q| weir_core::text::query_param(q, k)).map(|v| weir_core::text::percent_decode(v).into_owned());
    let mut problems = Vec::new();
    let mut time = |k: &'static str| match param(k) {
        None => None,
        Some(t) => match time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339) {
            Ok(t) => Some(t.unix_timestamp()),
            Err(e) => {
                problems.push(format!("{k}: not an RFC 3339 time: {e}"));
                None
            }
        },
    };
    let (from, to) = (time("from"), time("to"));
    let step = match param("step").map(|s| s.parse::<i64>()) {
        None => 60,
        Some(Ok(s)) if s >= 60 && s % 60 == 0 => s,
        Some(_) => {
            problems.push("step: must be a whole number of minutes in seconds (60, 300, 3600, ...): usage is counted per minute".into());
            60
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    // By default, to the end of the minute under way (even in its first second).
    let to = to.unwrap_or(now.div_euclid(60) * 60 + 60);
    let from = from.unwrap_or(to - 3600);
    // Whole minutes: `to` rounded up, so the minute under way is in; nothing before 1970,
    // where no usage was ever counted.
    let (from, to) = (from.max(0).div_euclid(60) * 60, (to + 59).div_euclid(60) * 60);
    if from >= to {
        return Err(vec!["from: must be before to, and to after 1970".into()]);
    }
    if (to - from) / step > MAX_POINTS {
        return Err(vec![format!("step: the window would have more than {MAX_POINTS} points; make the step longer or the window shorter")]);
    }
    // A step longer than the window is the whole window (one point).
    Ok(Window { from, to, step: step.min(to - from) })
}

/// The answer for minutes `minutes` (oldest first) of `w`.
fn series(w: &Window, minutes: &[Minute]) -> Vec<Point> {
    let round = |v: Option<f64>| v.map(|v| (v * 1000.0).round() / 1000.0);
    // Each minute into its step, in one pass.
    let points = ((w.to - w.from + w.step - 1) / w.step) as usize;
    let mut steps: Vec<Vec<&Minute>> = vec![Vec::new(); points];
    for m in minutes {
        let at = i64::from(m.minute) * 60;
        if (w.from..w.to).contains(&at) {
            steps[((at - w.from) / w.step) as usize].push(m);
        }
    }
    steps
        .iter()
        .enumerate()
        .map(|(i, list)| {
            let m = grant_usage::sum(list.iter().copied());
            Point { time: rfc3339(w.from + i as i64 * w.step), requests: m.requests, errors: m.errors, p50_ms: round(m.quantile_ms(0.5)), p99_ms: round(m.quantile_ms(0.99)) }
        })
        .collect()
}

impl Platform {
    pub(crate) async fn usage(&self, app: &Application, query: Option<&str>) -> Reply {
        let w = match window(query, time::OffsetDateTime::now_utc().unix_timestamp()) {
            Ok(w) => w,
            Err(problems) => return bad_input(problems),
        };
        let grants = match self.grants_where(|g| g.app_id == app.app_id).await {
            Ok(g) => g,
            Err(r) => return r,
        };
        let (lo, hi) = ((w.from / 60) as u32, (w.to / 60) as u32);
        let mut all = Vec::new();
        let mut per_grant = Vec::new();
        for g in &grants {
            let minutes = grant_usage::usage(&g.credential_id, lo, hi);
            let total = grant_usage::sum(&minutes);
            per_grant.push(GrantUsage {
                grant_id: g.grant_id.clone(),
                credential_id: g.credential_id.clone(),
                gateway_id: g.gateway_id.clone(),
                environment: g.environment.clone(),
                requests: total.requests,
                errors: total.errors,
            });
            all.extend(minutes);
        }
        let total = grant_usage::sum(&all);
        let usage = Usage {
            app_id: app.app_id.clone(),
            from: rfc3339(w.from),
            to: rfc3339(w.to),
            step: w.step,
            totals: Totals { requests: total.requests, errors: total.errors },
            grants: per_grant,
            series: series(&w, &all),
        };
        json(StatusCode::OK, &serde_json::to_value(&usage).expect("usage serializes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_minutes_and_checked() {
        let now = 1_800_000_030;
        assert_eq!(window(None, now).unwrap(), Window { from: 1_799_996_460, to: 1_800_000_060, step: 60 });
        assert_eq!(window(None, 1_800_000_000).unwrap().to, 1_800_000_060, "the minute under way is in from its first second");
        let q = "from=2027-01-01T00%3A00%3A30Z&to=2027-01-01T01:00:00Z&step=300";
        let w = window(Some(q), now).unwrap();
        assert_eq!((w.to - w.from, w.step, w.from % 60), (3600, 300, 0), "from rounded down to its minute");
        for bad in ["step=59", "step=90", "step=x", "step=60.0", "step=-60", "from=yesterday", "from=2027-01-01T02:00:00Z&to=2027-01-01T01:00:00Z", "from=2000-01-01T00:00:00Z&to=2027-01-01T00:00:00Z&step=60", "to=1960-01-01T00:00:00Z"] {
            assert!(window(Some(bad), now).is_err(), "{bad}");
        }
        // A step past the window, however long, is the window: one point, no overflow.
        for huge in ["step=9223372036854775800", "step=86400"] {
            let w = window(Some(huge), now).unwrap();
            assert_eq!(w.step, w.to - w.from, "{huge}");
            assert_eq!(series(&w, &[]).len(), 1, "{huge}");
        }
        let w = window(Some("from=1960-01-01T00:00:00Z&to=1970-01-01T01:00:00Z&step=3600"), now).unwrap();
        assert_eq!((w.from, w.to), (0, 3600), "nothing before 1970");
    }

    #[test]
    fn series_sum_each_step() {
        let w = Window { from: 600, to: 600 + 5 * 60, step: 120 };
        let m = |minute, requests| {
            let mut m = Minute { minute, requests, errors: 1, ..Minute::default() };
            m.latency[3] = requests;
            m
        };
        let s = series(&w, &[m(10, 2), m(11, 3), m(14, 4), m(15, 9)]);
        let got: Vec<(u64, u64)> = s.iter().map(|p| (p.requests, p.errors)).collect();
        assert_eq!(got, [(5, 2), (0, 0), (4, 1)], "the last step ends with the window");
        assert_eq!((s[1].p50_ms, s[1].p99_ms), (None, None));
        assert_eq!(s[0].time, "1970-01-01T00:10:00Z");
        assert!(s[0].p50_ms.is_some_and(|p| p > 0.5 && p <= 1.0), "{:?}", s[0]);
    }
}
