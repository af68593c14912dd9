//! `traffic-split`: sends a share of the requests (or those matching `vars`) to other
//! upstreams. Each rule's `weighted_upstreams` are picked by smooth weighted round robin; an
//! entry without an upstream means the route's own.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use weir_core::expr::Expr;

use crate::{LegacyFactory, Factory, FilterVars, Plugin, Reply, RequestCtx};

pub(crate) fn factory() -> Factory {
    // An inline upstream is checked as an `upstreams` object is: every field it may have, and
    // no other (APISIX's traffic-split takes the same definition).
    let upstream = weir_catalog::upstream_schema();
    LegacyFactory {
        name: "traffic-split",
        priority: 966,
        schema: json!({"type": "object", "properties": {
            "rules": {"type": "array", "items": {"type": "object", "properties": {
                "match": {"type": "array", "items": {"type": "object", "properties": {"vars": {"type": "array"}}}},
                "weighted_upstreams": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
                    "upstream_id": {"type": ["string", "integer"]},
                    "upstream": upstream,
                    "weight": {"type": "integer", "minimum": 0, "default": 1}
                }}}
            }, "required": ["weighted_upstreams"]}}
        }}),
        consumer_schema: None,
        credential: None,
        build: |conf, _| Ok(Arc::new(build(conf)?)),
    }
    .into()
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

fn build(conf: &Value) -> Result<TrafficSplit, String> {
    let mut next = 0;
    let mut rules = Vec::new();
    for rule in conf.get("rules").and_then(Value::as_array).into_iter().flatten() {
        let matches = rule
            .get("match")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| m.get("vars"))
            .map(|v| Expr::compile(v).map_err(|e| format!("match.vars: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut targets = Vec::new();
        for wu in rule.get("weighted_upstreams").and_then(Value::as_array).into_iter().flatten() {
            let weight = wu.get("weight").and_then(Value::as_i64).unwrap_or(1);
            // Numbered as the snapshot numbers the route's alternatives.
            let index = if wu.get("upstream_id").is_some() || wu.get("upstream").is_some() {
                next += 1;
                Some(next - 1)
            } else {
                None
            };
            targets.push((weight, index));
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
    use super::*;

    #[test]
    fn weights_are_kept_and_own_upstream_is_none() {
        let ts = build(&json!({"rules": [{"weighted_upstreams": [
            {"upstream_id": "a", "weight": 3}, {"weight": 1}
        ]}]}))
        .unwrap();
        let picks: Vec<_> = (0..8).map(|_| ts.rules[0].pick().unwrap()).collect();
        assert_eq!(picks.iter().filter(|p| **p == Some(0)).count(), 6);
        assert_eq!(picks.iter().filter(|p| p.is_none()).count(), 2);
    }
}
