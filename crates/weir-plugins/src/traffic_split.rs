//! `traffic-split`: sends a share of the requests (or those matching `vars`) to other
//! upstreams. Each rule's `weighted_upstreams` are picked by smooth weighted round robin; an
//! entry without an upstream means the route's own.

use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::Value;
use weir_core::expr::Expr;

use crate::{Factory, FilterVars, JsonSchema, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    Factory::new("traffic-split", 966, |c: Config, _| Ok(Arc::new(build(c)?)))
}

#[derive(Deserialize, JsonSchema)]
struct Config {
    /// The first rule whose `match` holds picks the upstream.
    rules: Option<Vec<RuleConfig>>,
}

#[derive(Deserialize, JsonSchema)]
struct RuleConfig {
    /// Any of these holding selects the rule; none at all selects it always.
    #[serde(rename = "match")]
    matches: Option<Vec<Match>>,
    /// The upstreams the rule shares requests between, by weight.
    #[schemars(length(min = 1))]
    weighted_upstreams: Vec<WeightedUpstream>,
}

#[derive(Deserialize, JsonSchema)]
struct Match {
    /// A condition (APISIX's `vars` expression) on the request.
    #[schemars(extend("type" = "array"))]
    vars: Option<Value>,
}

/// An upstream and its share; with neither `upstream_id` nor `upstream`, the route's own.
#[derive(Deserialize, JsonSchema)]
struct WeightedUpstream {
    /// An `upstreams` object, by id.
    #[schemars(extend("type" = ["string", "integer"]))]
    upstream_id: Option<Value>,
    /// An upstream, inline.
    upstream: Option<InlineUpstream>,
    /// This upstream's share of the rule's requests.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    weight: i64,
}

/// Checked as an `upstreams` object is: every field it may have, and no other. The snapshot
/// reads it; here only its presence counts.
#[derive(Deserialize, JsonSchema)]
struct InlineUpstream(#[schemars(schema_with = "upstream_schema")] #[allow(dead_code)] Value);

fn upstream_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    weir_catalog::upstream_schema().try_into().expect("the upstream schema is an object")
}

fn one() -> i64 {
    1
}

struct Rule {
    /// Any of these holding selects the rule; none at all selects it always.
    matches: Vec<Expr>,
    /// (weight, index into the route's alternatives or `None` for its own upstream).
    targets: Vec<(i64, Option<usize>)>,
    /// Smooth weighted round robin state, one per target.
    current: Mutex<Vec<i64>>,
}

struct TrafficSplit {
    rules: Vec<Rule>,
}

fn build(c: Config) -> Result<TrafficSplit, String> {
    let mut next = 0;
    let mut rules = Vec::new();
    for rule in c.rules.into_iter().flatten() {
        let matches = rule
            .matches
            .into_iter()
            .flatten()
            .filter_map(|m| m.vars)
            .map(|v| Expr::compile(&v).map_err(|e| format!("match.vars: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut targets = Vec::new();
        for wu in rule.weighted_upstreams {
            // Numbered as the snapshot numbers the route's alternatives.
            let index = if wu.upstream_id.is_some() || wu.upstream.is_some() {
                next += 1;
                Some(next - 1)
            } else {
                None
            };
            targets.push((wu.weight, index));
        }
        let current = Mutex::new(vec![0; targets.len()]);
        rules.push(Rule { matches, targets, current });
    }
    Ok(TrafficSplit { rules })
}

impl Rule {
    fn pick(&self) -> Option<Option<usize>> {
        let total: i64 = self.targets.iter().map(|(w, _)| w).sum();
        if total == 0 {
            return None;
        }
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut best = 0;
        for (i, (w, _)) in self.targets.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        Some(self.targets[best].1)
    }
}

impl Plugin for TrafficSplit {
    fn access(&self, ctx: &mut RequestCtx<'_>) -> Result<(), Reply> {
        let vars = FilterVars(ctx);
        let Some(rule) = self.rules.iter().find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.eval(&vars))) else {
            return Ok(());
        };
        if let Some(choice) = rule.pick() {
            ctx.upstream_choice = choice;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn weights_are_kept_and_own_upstream_is_none() {
        let ts = build(crate::parse(&json!({"rules": [{"weighted_upstreams": [
            {"upstream_id": "a", "weight": 3}, {"weight": 1}
        ]}]})).unwrap())
        .unwrap();
        let picks: Vec<_> = (0..8).map(|_| ts.rules[0].pick().unwrap()).collect();
        assert_eq!(picks.iter().filter(|p| **p == Some(0)).count(), 6);
        assert_eq!(picks.iter().filter(|p| p.is_none()).count(), 2);
    }
}
