//! The `vars` expression language of APISIX routes (lua-resty-expr): a list of conditions
//! `[var, op, value]` (all must hold), optionally negated with `[var, "!", op, value]`, and
//! nested with `["AND", …]` / `["OR", …]` (and `"!AND"` / `"!OR"`).
//!
//! Semantics, as lua-resty-expr has them:
//! - a comparison with a number on the right compares numerically; a var that is not a number
//!   then fails the comparison;
//! - a missing var fails every operator except `~=`, which it passes;
//! - `in` takes an array; `has` asks whether a comma-separated var contains the value;
//! - `ipmatch` takes an address or CIDR, or an array of them.

use std::borrow::Cow;

use ipnet::IpNet;
use regex::Regex;
use serde_json::Value;

use crate::model::parse_ip_net;

/// Where an expression reads request variables from.
pub trait Vars {
    fn get(&self, name: &str) -> Option<Cow<'_, str>>;
}

#[derive(Debug, Clone)]
pub enum Expr {
    All(Vec<Expr>),
    Any(Vec<Expr>),
    Not(Box<Expr>),
    Cond { var: String, op: Op },
}

#[derive(Debug, Clone)]
pub enum Literal {
    Str(String),
    Num(f64),
    /// `true`, `false` and `null` compare as their JSON text.
    Other(String),
}

#[derive(Debug, Clone)]
pub enum Op {
    Eq(Literal),
    Ne(Literal),
    Gt(f64),
    Ge(f64),
    Lt(f64),
    Le(f64),
    Regex(Regex),
    In(Vec<Literal>),
    Has(String),
    IpMatch(Vec<IpNet>),
}

fn literal(v: &Value) -> Literal {
    match v {
        Value::String(s) => Literal::Str(s.clone()),
        Value::Number(n) => Literal::Num(n.as_f64().unwrap_or(f64::NAN)),
        other => Literal::Other(other.to_string()),
    }
}

impl Literal {
    fn matches(&self, l: &str) -> bool {
        match self {
            Literal::Str(s) => s == l,
            Literal::Num(n) => l.trim().parse::<f64>().is_ok_and(|v| v == *n),
            Literal::Other(s) => s == l,
        }
    }
}

fn number(v: &Value, op: &str) -> Result<f64, String> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("operator {op}: bad number")),
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("operator {op} needs a number, got \"{s}\"")),
        other => Err(format!("operator {op} needs a number, got {other}")),
    }
}

impl Expr {
    /// Compiles the JSON form. An empty array is an expression that always holds.
    pub fn compile(v: &Value) -> Result<Expr, String> {
        let Value::Array(items) = v else {
            return Err("rule should be an array".into());
        };
        let Some(first) = items.first() else {
            return Ok(Expr::All(Vec::new()));
        };
        match first {
            Value::Array(_) => items.iter().map(Expr::compile).collect::<Result<_, _>>().map(Expr::All),
            Value::String(s) if matches!(s.as_str(), "AND" | "OR" | "!AND" | "!OR") => {
                let subs = items[1..].iter().map(Expr::compile).collect::<Result<Vec<_>, _>>()?;
                if subs.is_empty() {
                    return Err(format!("{s} needs at least one rule"));
                }
                let e = if s.ends_with("AND") { Expr::All(subs) } else { Expr::Any(subs) };
                Ok(if s.starts_with('!') { Expr::Not(Box::new(e)) } else { e })
            }
            Value::String(var) => Self::compile_cond(var, &items[1..]),
            other => Err(format!("invalid rule head {other}")),
        }
    }

    fn compile_cond(var: &str, rest: &[Value]) -> Result<Expr, String> {
        let (negate, rest) = match rest.first() {
            Some(Value::String(s)) if s == "!" => (true, &rest[1..]),
            _ => (false, rest),
        };
        let [op, value] = rest else {
            return Err(format!("rule for \"{var}\" should be [var, op, value]"));
        };
        let Value::String(op) = op else {
            return Err(format!("invalid operator {op}"));
        };
        let op = match op.as_str() {
            "==" => Op::Eq(literal(value)),
            "~=" => Op::Ne(literal(value)),
            ">" => Op::Gt(number(value, op)?),
            ">=" => Op::Ge(number(value, op)?),
            "<" => Op::Lt(number(value, op)?),
            "<=" => Op::Le(number(value, op)?),
            "~~" | "~*" => {
                let Value::String(pat) = value else {
                    return Err(format!("operator {op} needs a regex string"));
                };
                let pat = if op == "~*" { format!("(?i){pat}") } else { pat.clone() };
                Op::Regex(Regex::new(&pat).map_err(|e| format!("invalid regex: {e}"))?)
            }
            "in" => {
                let Value::Array(vals) = value else {
                    return Err("operator in needs an array".into());
                };
                Op::In(vals.iter().map(literal).collect())
            }
            "has" => Op::Has(match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
            "ipmatch" => {
                let list: Vec<&Value> = match value {
                    Value::Array(a) => a.iter().collect(),
                    v => vec![v],
                };
                let mut nets = Vec::new();
                for v in list {
                    let s = v.as_str().ok_or("operator ipmatch needs IP strings")?;
                    nets.push(parse_ip_net(s).ok_or_else(|| format!("invalid ip address: {s}"))?);
                }
                Op::IpMatch(nets)
            }
            other => return Err(format!("invalid operator '{other}'")),
        };
        let cond = Expr::Cond { var: var.to_string(), op };
        Ok(if negate { Expr::Not(Box::new(cond)) } else { cond })
    }

    pub fn eval(&self, vars: &dyn Vars) -> bool {
        match self {
            Expr::All(es) => es.iter().all(|e| e.eval(vars)),
            Expr::Any(es) => es.iter().any(|e| e.eval(vars)),
            Expr::Not(e) => !e.eval(vars),
            Expr::Cond { var, op } => {
                let v = vars.get(var);
                let Some(l) = v.as_deref() else {
                    return matches!(op, Op::Ne(_));
                };
                let num = || l.trim().parse::<f64>().ok();
                match op {
                    Op::Eq(r) => r.matches(l),
                    Op::Ne(r) => !r.matches(l),
                    Op::Gt(r) => num().is_some_and(|x| x > *r),
                    Op::Ge(r) => num().is_some_and(|x| x >= *r),
                    Op::Lt(r) => num().is_some_and(|x| x < *r),
                    Op::Le(r) => num().is_some_and(|x| x <= *r),
                    Op::Regex(re) => re.is_match(l),
                    Op::In(list) => list.iter().any(|r| r.matches(l)),
                    Op::Has(r) => l.split(',').any(|item| item.trim() == r),
                    Op::IpMatch(nets) => {
                        l.parse::<std::net::IpAddr>().is_ok_and(|ip| nets.iter().any(|n| n.contains(&ip)))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    struct M(HashMap<&'static str, &'static str>);
    impl Vars for M {
        fn get(&self, name: &str) -> Option<Cow<'_, str>> {
            self.0.get(name).map(|v| Cow::Borrowed(*v))
        }
    }

    fn eval(rule: Value, vars: &[(&'static str, &'static str)]) -> bool {
        Expr::compile(&rule).unwrap().eval(&M(vars.iter().copied().collect()))
    }

    #[test]
    fn operators() {
        let v = [("arg_a", "10"), ("http_x", "Hello"), ("remote_addr", "10.1.2.3"), ("http_acc", "gzip, br")];
        let cases: Vec<(Value, bool)> = vec![
            (json!([["arg_a", "==", "10"]]), true),
            (json!([["arg_a", "==", 10]]), true),
            (json!([["arg_a", "==", "10.0"]]), false),
            (json!([["arg_a", "==", 10.0]]), true),
            (json!([["arg_a", "~=", "11"]]), true),
            (json!([["arg_missing", "~=", "11"]]), true),
            (json!([["arg_missing", "==", "11"]]), false),
            (json!([["arg_a", ">", 9]]), true),
            (json!([["arg_a", ">=", 10]]), true),
            (json!([["arg_a", "<", 10]]), false),
            (json!([["arg_a", "<=", "10"]]), true),
            (json!([["http_x", ">", 1]]), false),
            (json!([["http_x", "~~", "^Hel"]]), true),
            (json!([["http_x", "~~", "^hel"]]), false),
            (json!([["http_x", "~*", "^hel"]]), true),
            (json!([["arg_a", "in", ["1", "10"]]]), true),
            (json!([["arg_a", "in", [1, 2]]]), false),
            (json!([["http_acc", "has", "br"]]), true),
            (json!([["http_acc", "has", "zstd"]]), false),
            (json!([["remote_addr", "ipmatch", ["10.0.0.0/8"]]]), true),
            (json!([["remote_addr", "ipmatch", "192.168.0.1"]]), false),
            (json!([["arg_a", "!", "==", "10"]]), false),
            (json!([["arg_a", "!", "~~", "^x"]]), true),
            (json!(["OR", ["arg_a", "==", "1"], ["http_x", "==", "Hello"]]), true),
            (json!(["AND", ["arg_a", "==", "1"], ["http_x", "==", "Hello"]]), false),
            (json!(["!AND", ["arg_a", "==", "1"], ["http_x", "==", "Hello"]]), true),
            (json!(["OR", ["AND", ["arg_a", "==", "10"], ["http_x", "==", "Hello"]], ["arg_b", "==", "2"]]), true),
            (json!([["arg_a", "==", "10"], ["http_x", "==", "nope"]]), false),
            (json!([]), true),
        ];
        for (rule, want) in cases {
            assert_eq!(eval(rule.clone(), &v), want, "rule {rule}");
        }
    }

    #[test]
    fn bad_rules_are_refused() {
        for rule in [
            json!("x"),
            json!([["a", "@@", "1"]]),
            json!([["a", ">", "x"]]),
            json!([["a", "~~", "("]]),
            json!([["a", "=="]]),
            json!([["a", "ipmatch", ["nope"]]]),
            json!(["OR"]),
            json!([["a", "in", "x"]]),
        ] {
            assert!(Expr::compile(&rule).is_err(), "{rule} should fail");
        }
    }
}
