//! Query filters in MongoDB's language, parsed once into a tree and matched against documents.
//!
//! Supported: equality (of any JSON value, dotted paths, an array field matching any of its
//! elements), `$eq $ne $gt $gte $lt $lte $in $nin $exists $not $regex` (with `$options`),
//! and `$and $or` at any level. Anything else is an error naming the operator: a filter
//! never silently matches more than it says. `$regex` runs on the `regex` crate, whose
//! matching time is linear in the text (no backtracking), with its pattern size bounded.

use std::cmp::Ordering;
use std::time::Instant;

use regex::Regex;
use serde_json::{Map, Value};

use crate::DbError;

/// The most nested a filter may be.
const DEPTH: usize = 32;
/// The largest compiled pattern `$regex` accepts, and how many one filter may have: each is
/// compiled when the filter is parsed.
const REGEX_SIZE: usize = 1 << 20;
pub(crate) const MAX_REGEXES: usize = 16;

/// How many `$regex` keys `v` holds, at any depth.
pub(crate) fn regexes_in(v: &Value) -> usize {
    let mut n = 0;
    let mut todo = vec![v];
    while let Some(v) = todo.pop() {
        match v {
            Value::Object(o) => {
                n += usize::from(o.contains_key("$regex"));
                todo.extend(o.values());
            }
            Value::Array(a) => todo.extend(a.iter()),
            _ => {}
        }
    }
    n
}

#[derive(Debug, Clone)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Field(String, Cond),
}

#[derive(Debug, Clone)]
pub enum Cond {
    Eq(Value),
    Ne(Value),
    Cmp(Ordering, bool, Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Exists(bool),
    Not(Box<Cond>),
    Regex(Regex),
    All(Vec<Cond>),
}

impl Filter {
    pub fn parse(v: &Value) -> Result<Filter, DbError> {
        if regexes_in(v) > MAX_REGEXES {
            return Err(DbError::bad(format!("a filter has at most {MAX_REGEXES} $regex")));
        }
        parse_doc(v, 0)
    }

    /// Matches everything.
    pub fn all() -> Filter {
        Filter::And(Vec::new())
    }

    pub fn matches(&self, doc: &Value) -> bool {
        self.matches_within(doc, &mut Budget::unlimited())
    }

    /// Whether `doc` matches, spending `budget` on each value compared: once it runs out every
    /// loop stops at once, the answer is meaningless and [`Budget::spent`] says so, so that one
    /// document with a long array against a long `$in` or `$or` cannot hold a query past its
    /// time.
    pub fn matches_within(&self, doc: &Value, budget: &mut Budget) -> bool {
        match self {
            Filter::And(fs) => fs.iter().all(|f| !budget.spent() && f.matches_within(doc, budget)),
            Filter::Or(fs) => fs.iter().any(|f| budget.spent() || f.matches_within(doc, budget)),
            Filter::Field(path, cond) => {
                // The walk to the values counts, though it finds none.
                let (found, looked) = resolve_counted(doc, path);
                budget.spend(looked + found.len()) && cond.matches(&found, budget)
            }
        }
    }

    /// The values `path` must equal (one of) for a document to match, when the filter says so
    /// at its top level: what an index on `path` can look up.
    pub fn equalities(&self, path: &str) -> Option<Vec<Value>> {
        match self {
            Filter::Field(p, c) if p == path => c.equalities(),
            Filter::And(fs) => fs.iter().find_map(|f| f.equalities(path)),
            _ => None,
        }
    }

    /// The fields set by equality at the top level: what an upsert starts from.
    pub fn seed(&self, into: &mut Map<String, Value>) {
        match self {
            Filter::Field(p, Cond::Eq(v)) if !p.contains('.') => {
                into.insert(p.clone(), v.clone());
            }
            Filter::Field(p, Cond::All(cs)) if !p.contains('.') => {
                if let Some(Cond::Eq(v)) = cs.iter().find(|c| matches!(c, Cond::Eq(_))) {
                    into.insert(p.clone(), v.clone());
                }
            }
            Filter::And(fs) => fs.iter().for_each(|f| f.seed(into)),
            _ => {}
        }
    }
}

impl Cond {
    fn equalities(&self) -> Option<Vec<Value>> {
        match self {
            // An array or object compared whole is not looked up by element.
            Cond::Eq(v) if !v.is_array() => Some(vec![v.clone()]),
            Cond::In(vs) if vs.iter().all(|v| !v.is_array()) => Some(vs.clone()),
            Cond::All(cs) => cs.iter().find_map(Cond::equalities),
            _ => None,
        }
    }

    /// `found`: the values the path leads to (none when it leads nowhere).
    pub(crate) fn matches(&self, found: &[&Value], budget: &mut Budget) -> bool {
        match self {
            Cond::Eq(v) => eq_any(found, v, budget),
            Cond::Ne(v) => !eq_any(found, v, budget),
            Cond::Cmp(want, or_equal, v) => candidates(found).any(|x| {
                !budget.spend(1)
                    || match compare_same_kind(x, v) {
                        Some(o) => o == *want || (*or_equal && o == Ordering::Equal),
                        None => false,
                    }
            }),
            Cond::In(vs) => vs.iter().any(|v| budget.spent() || eq_any(found, v, budget)),
            Cond::Nin(vs) => !vs.iter().any(|v| budget.spent() || eq_any(found, v, budget)),
            Cond::Exists(want) => found.is_empty() != *want,
            Cond::Not(c) => !c.matches(found, budget),
            Cond::Regex(re) => candidates(found).any(|x| !budget.spend(1) || x.as_str().is_some_and(|s| re.is_match(s))),
            Cond::All(cs) => cs.iter().all(|c| !budget.spent() && c.matches(found, budget)),
        }
    }
}

/// What a match may still do: comparisons counted, and the clock read every few thousand.
pub struct Budget {
    deadline: Option<Instant>,
    count: u32,
    spent: bool,
}

impl Budget {
    /// Comparisons between two readings of the clock.
    const STRIDE: u32 = 4096;

    pub fn until(deadline: Instant) -> Budget {
        Budget { deadline: Some(deadline), count: 0, spent: false }
    }

    pub fn unlimited() -> Budget {
        Budget { deadline: None, count: 0, spent: false }
    }

    /// Counts `n` comparisons; `false` once the deadline has passed.
    fn spend(&mut self, n: usize) -> bool {
        let before = self.count;
        self.count = self.count.wrapping_add(n.min(u32::MAX as usize) as u32);
        if !self.spent && (self.count / Self::STRIDE != before / Self::STRIDE || n >= Self::STRIDE as usize) {
            self.spent = self.deadline.is_some_and(|d| Instant::now() > d);
        }
        !self.spent
    }

    /// Whether the deadline passed during a match, which then answered nothing reliable.
    pub fn spent(&self) -> bool {
        self.spent
    }
}

/// A value found, and each element of a found array (as MongoDB matches arrays).
fn candidates<'a>(found: &'a [&'a Value]) -> impl Iterator<Item = &'a Value> {
    found.iter().flat_map(|v| std::iter::once(*v).chain(v.as_array().into_iter().flatten()))
}

/// Equality as MongoDB has it: `null` also matches a missing field, and an array field
/// matches a value equal to it or to one of its elements.
fn eq_any(found: &[&Value], v: &Value, budget: &mut Budget) -> bool {
    if v.is_null() && found.is_empty() {
        return true;
    }
    candidates(found).any(|x| !budget.spend(1) || json_eq(x, v))
}

/// Equality of JSON values where numbers compare by value (`1` equals `1.0`), exactly: two
/// integers past 2^53 that round to one double are still two values.
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_cmp(x, y) == Ordering::Equal,
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b)),
        (Value::Object(x), Value::Object(y)) => x.len() == y.len() && x.iter().zip(y).all(|((ka, a), (kb, b))| ka == kb && json_eq(a, b)),
        _ => a == b,
    }
}

/// A JSON number as the value it names: an integer (JSON's integers up to 64 bits are read
/// exactly) or a double.
enum Num {
    Int(i128),
    Float(f64),
}

fn num(n: &serde_json::Number) -> Num {
    match (n.as_i64(), n.as_u64()) {
        (Some(i), _) => Num::Int(i128::from(i)),
        (None, Some(u)) => Num::Int(i128::from(u)),
        // JSON holds no NaN or infinity.
        _ => Num::Float(n.as_f64().unwrap_or(0.0)),
    }
}

/// The order of two numbers by their exact values, whatever their forms: `1` and `1.0` are
/// equal, and 9007199254740993 is above 9007199254740992.0, which is the double nearest it.
pub fn num_cmp(a: &serde_json::Number, b: &serde_json::Number) -> Ordering {
    match (num(a), num(b)) {
        (Num::Int(x), Num::Int(y)) => x.cmp(&y),
        // `-0.0` equals `0.0`.
        (Num::Float(x), Num::Float(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        (Num::Int(i), Num::Float(f)) => int_float_cmp(i, f),
        (Num::Float(f), Num::Int(i)) => int_float_cmp(i, f).reverse(),
    }
}

/// Integer `i` (at most 64 bits) against double `f`. Rounding `i` to a double keeps order
/// where it differs from `f` (no double lies strictly between `i` and the double nearest
/// it), and where it equals `f`, `f` is an integer of at most 65 bits, held exactly in i128.
fn int_float_cmp(i: i128, f: f64) -> Ordering {
    match (i as f64).partial_cmp(&f) {
        Some(Ordering::Equal) => i.cmp(&(f as i128)),
        Some(o) => o,
        None => Ordering::Equal,
    }
}

/// Order within one kind (numbers, strings, booleans); `None` across kinds, as a range
/// operator matches only values of its operand's kind.
fn compare_same_kind(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => Some(num_cmp(x, y)),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// MongoDB's order across kinds, for sorting: null, numbers, strings, objects, arrays,
/// booleans.
pub fn compare(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Number(_) => 1,
            Value::String(_) => 2,
            Value::Object(_) => 3,
            Value::Array(_) => 4,
            Value::Bool(_) => 5,
        }
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x.iter().zip(y).map(|((ka, a), (kb, b))| ka.cmp(kb).then_with(|| compare(a, b))).find(|o| o.is_ne()).unwrap_or(x.len().cmp(&y.len())),
        (Value::Array(x), Value::Array(y)) => x.iter().zip(y).map(|(a, b)| compare(a, b)).find(|o| o.is_ne()).unwrap_or(x.len().cmp(&y.len())),
        _ => compare_same_kind(a, b).unwrap_or_else(|| rank(a).cmp(&rank(b))),
    }
}

/// The values a dotted path leads to in `doc`: through objects by key, into arrays by index
/// when the part is a number, and across every element of an array otherwise.
pub fn resolve<'a>(doc: &'a Value, path: &str) -> Vec<&'a Value> {
    resolve_counted(doc, path).0
}

/// As [`resolve`], with how many values it looked at on the way (an array it walked counts
/// each element, whether or not the path went on there).
fn resolve_counted<'a>(doc: &'a Value, path: &str) -> (Vec<&'a Value>, usize) {
    let mut here = vec![doc];
    let mut looked = 0;
    for part in path.split('.') {
        let mut next = Vec::new();
        for v in here {
            looked += 1;
            match v {
                Value::Object(o) => next.extend(o.get(part)),
                Value::Array(a) => match part.parse::<usize>() {
                    Ok(i) => next.extend(a.get(i)),
                    Err(_) => {
                        looked += a.len();
                        next.extend(a.iter().filter_map(|e| e.as_object().and_then(|o| o.get(part))));
                    }
                },
                _ => {}
            }
        }
        here = next;
    }
    (here, looked)
}

fn parse_doc(v: &Value, depth: usize) -> Result<Filter, DbError> {
    if depth > DEPTH {
        return Err(DbError::bad("the filter is nested too deeply"));
    }
    let Some(o) = v.as_object() else { return Err(DbError::bad("a filter is an object")) };
    let mut all = Vec::with_capacity(o.len());
    for (k, v) in o {
        all.push(match k.as_str() {
            "$and" | "$or" => {
                let list = v.as_array().filter(|a| !a.is_empty()).ok_or_else(|| DbError::bad(format!("{k} takes a non-empty array of filters")))?;
                let fs = list.iter().map(|f| parse_doc(f, depth + 1)).collect::<Result<Vec<_>, _>>()?;
                if k == "$and" { Filter::And(fs) } else { Filter::Or(fs) }
            }
            op if op.starts_with('$') => return Err(DbError::bad(format!("unknown or unsupported operator {op}"))),
            path => {
                check_path(path)?;
                Filter::Field(path.to_string(), parse_cond(v, depth + 1)?)
            }
        });
    }
    Ok(if all.len() == 1 { all.pop().expect("one") } else { Filter::And(all) })
}

fn check_path(path: &str) -> Result<(), DbError> {
    if path.is_empty() || path.len() > 1024 || path.split('.').any(str::is_empty) {
        return Err(DbError::bad(format!("{path:?} is not a field path")));
    }
    Ok(())
}

fn is_operators(o: &Map<String, Value>) -> bool {
    o.keys().next().is_some_and(|k| k.starts_with('$'))
}

fn parse_cond(v: &Value, depth: usize) -> Result<Cond, DbError> {
    if depth > DEPTH {
        return Err(DbError::bad("the filter is nested too deeply"));
    }
    let Some(o) = v.as_object().filter(|o| is_operators(o)) else { return Ok(Cond::Eq(v.clone())) };
    let options = o.get("$options").map(|v| v.as_str().ok_or_else(|| DbError::bad("$options is a string"))).transpose()?;
    let mut conds = Vec::with_capacity(o.len());
    for (op, arg) in o {
        conds.push(match op.as_str() {
            "$eq" => Cond::Eq(arg.clone()),
            "$ne" => Cond::Ne(arg.clone()),
            "$gt" => Cond::Cmp(Ordering::Greater, false, arg.clone()),
            "$gte" => Cond::Cmp(Ordering::Greater, true, arg.clone()),
            "$lt" => Cond::Cmp(Ordering::Less, false, arg.clone()),
            "$lte" => Cond::Cmp(Ordering::Less, true, arg.clone()),
            "$in" | "$nin" => {
                let list = arg.as_array().ok_or_else(|| DbError::bad(format!("{op} takes an array")))?.clone();
                if op == "$in" { Cond::In(list) } else { Cond::Nin(list) }
            }
            "$exists" => Cond::Exists(match arg {
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => return Err(DbError::bad("$exists takes true or false")),
            }),
            "$not" => match arg {
                Value::Object(inner) if is_operators(inner) => Cond::Not(Box::new(parse_cond(arg, depth + 1)?)),
                _ => return Err(DbError::bad("$not takes an operator expression, such as {\"$gt\": 5}")),
            },
            "$regex" => Cond::Regex(regex(arg, options)?),
            "$options" if o.contains_key("$regex") => continue,
            "$options" => return Err(DbError::bad("$options goes with $regex")),
            other if other.starts_with('$') => return Err(DbError::bad(format!("unknown or unsupported operator {other}"))),
            other => return Err(DbError::bad(format!("{other:?} mixes a field with operators"))),
        });
    }
    Ok(if conds.len() == 1 { conds.pop().expect("one") } else { Cond::All(conds) })
}

fn regex(arg: &Value, options: Option<&str>) -> Result<Regex, DbError> {
    let pattern = arg.as_str().ok_or_else(|| DbError::bad("$regex takes a string"))?;
    let mut flags = String::new();
    for c in options.unwrap_or("").chars() {
        match c {
            'i' | 'm' | 's' | 'x' => flags.push(c),
            other => return Err(DbError::bad(format!("$options: unsupported flag {other:?} (i, m, s, x)"))),
        }
    }
    let full = if flags.is_empty() { pattern.to_string() } else { format!("(?{flags}){pattern}") };
    regex::RegexBuilder::new(&full).size_limit(REGEX_SIZE).dfa_size_limit(REGEX_SIZE).build().map_err(|e| DbError::bad(format!("$regex: {e}")))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn hit(filter: Value, doc: Value) -> bool {
        Filter::parse(&filter).unwrap().matches(&doc)
    }

    fn n(text: &str) -> serde_json::Number {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn numbers_compare_by_their_exact_values() {
        use Ordering::*;
        for (a, b, o) in [
            ("1", "1.0", Equal),
            ("-0.0", "0", Equal),
            ("2.5", "2", Greater),
            // Past 2^53 integers are exact, and apart from the doubles nearest them.
            ("9007199254740993", "9007199254740992", Greater),
            ("9007199254740993", "9007199254740992.0", Greater),
            ("9007199254740993", "9007199254740994.0", Less),
            ("9007199254740992", "9007199254740992.0", Equal),
            ("18446744073709551615", "18446744073709551614", Greater),
            ("18446744073709551615", "18446744073709551616.0", Less),
            ("-9223372036854775808", "-9223372036854775808.0", Equal),
            ("-9223372036854775807", "-9223372036854775808.0", Greater),
            ("18446744073709551615", "1e300", Less),
            ("-1e300", "-9223372036854775808", Less),
        ] {
            assert_eq!(num_cmp(&n(a), &n(b)), o, "{a} against {b}");
            assert_eq!(num_cmp(&n(b), &n(a)), o.reverse(), "{b} against {a}");
        }
        let big = json!({"n": 9007199254740993u64});
        assert!(!hit(json!({"n": 9007199254740992u64}), big.clone()));
        assert!(hit(json!({"n": 9007199254740993u64}), big.clone()));
        assert!(hit(json!({"n": {"$gt": 9007199254740992u64}}), big.clone()));
        assert!(!hit(json!({"n": {"$in": [9007199254740992.0, 9007199254740994u64]}}), big.clone()));
        assert!(!json_eq(&json!([9007199254740993u64]), &json!([9007199254740992u64])));
        assert_eq!(compare(&json!(9007199254740993u64), &json!(9007199254740992.0)), Greater);
    }

    #[test]
    fn equality_dotted_paths_and_arrays() {
        let doc = json!({"a": 1, "b": {"c": "x"}, "tags": ["red", "blue"], "items": [{"n": 1}, {"n": 2}]});
        assert!(hit(json!({"a": 1.0}), doc.clone()));
        assert!(hit(json!({"b.c": "x"}), doc.clone()));
        assert!(hit(json!({"tags": "blue"}), doc.clone()));
        assert!(hit(json!({"tags": ["red", "blue"]}), doc.clone()));
        assert!(hit(json!({"items.n": 2}), doc.clone()));
        assert!(hit(json!({"items.1.n": 2}), doc.clone()));
        assert!(!hit(json!({"items.0.n": 2}), doc.clone()));
        assert!(hit(json!({"missing": null}), doc.clone()));
        assert!(!hit(json!({"a": 2}), doc.clone()));
        assert!(hit(json!({}), doc));
    }

    #[test]
    fn operators() {
        let doc = json!({"age": 30, "name": "Ada", "tags": ["x"]});
        assert!(hit(json!({"age": {"$gt": 20, "$lte": 30}}), doc.clone()));
        assert!(!hit(json!({"age": {"$gt": "20"}}), doc.clone()), "ranges match within a kind");
        assert!(hit(json!({"age": {"$in": [1, 30]}, "name": {"$nin": ["Bob"]}}), doc.clone()));
        assert!(hit(json!({"age": {"$ne": 31}, "nick": {"$exists": false}}), doc.clone()));
        assert!(hit(json!({"age": {"$not": {"$lt": 18}}}), doc.clone()));
        assert!(hit(json!({"$or": [{"age": 1}, {"name": {"$regex": "^a", "$options": "i"}}]}), doc.clone()));
        assert!(hit(json!({"$and": [{"age": 30}, {"tags": {"$eq": "x"}}]}), doc.clone()));
        assert!(!hit(json!({"name": {"$regex": "^a"}}), doc));
    }

    #[test]
    fn unknown_operators_are_errors_naming_them() {
        for (f, op) in [(json!({"$where": "1"}), "$where"), (json!({"$nor": []}), "$nor"), (json!({"a": {"$elemMatch": {}}}), "$elemMatch"), (json!({"a": {"$gt": 1, "$size": 2}}), "$size")] {
            let e = Filter::parse(&f).unwrap_err();
            assert!(e.message.contains(op), "{e:?}");
        }
        assert!(Filter::parse(&json!([1])).is_err());
        assert!(Filter::parse(&json!({"a": {"$not": 5}})).is_err());
        assert!(Filter::parse(&json!({"a": {"$regex": "("}})).is_err());
    }

    #[test]
    fn catastrophic_patterns_run_in_linear_time() {
        let f = Filter::parse(&json!({"s": {"$regex": "^(a+)+$"}})).unwrap();
        let text = format!("{}b", "a".repeat(100_000));
        let started = std::time::Instant::now();
        assert!(!f.matches(&json!({"s": text})));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn a_filter_compiles_a_bounded_number_of_patterns() {
        // Each `\w{20}` compiles to most of the pattern size limit: so many of them are refused
        // before any is compiled.
        let clauses = |n: usize| json!({"$or": (0..n).map(|i| json!({format!("f{i}"): {"$regex": "\\w{20}"}})).collect::<Vec<_>>()});
        let f = Filter::parse(&clauses(MAX_REGEXES)).unwrap();
        assert!(f.matches(&json!({"f3": "a".repeat(20)})));
        let e = Filter::parse(&clauses(MAX_REGEXES + 1)).unwrap_err();
        assert!(e.message.contains("at most 16 $regex"), "{}", e.message);
        let nested = json!({"$and": [clauses(8), {"$or": [clauses(8), {"x": {"$not": {"$regex": "a"}}}]}]});
        assert!(Filter::parse(&nested).is_err());
    }

    #[test]
    fn equalities_feed_indexes() {
        let f = Filter::parse(&json!({"email": "a@b", "age": {"$gt": 1}})).unwrap();
        assert_eq!(f.equalities("email"), Some(vec![json!("a@b")]));
        assert_eq!(f.equalities("age"), None);
        let f = Filter::parse(&json!({"email": {"$in": ["a", "b"]}})).unwrap();
        assert_eq!(f.equalities("email"), Some(vec![json!("a"), json!("b")]));
        assert_eq!(Filter::parse(&json!({"$or": [{"email": "a"}]})).unwrap().equalities("email"), None);
    }

    #[test]
    fn sorting_orders_kinds_as_mongodb_does() {
        let mut v = vec![json!("b"), json!(true), json!(2), json!(null), json!("a"), json!(1.5)];
        v.sort_by(compare);
        assert_eq!(v, vec![json!(null), json!(1.5), json!(2), json!("a"), json!("b"), json!(true)]);
    }
}
