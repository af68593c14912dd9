//! Updates (`$set $unset $inc $push $pull`), projections, sorting, and what a stored document
//! must be.

use std::time::Instant;

use serde_json::{Map, Value};

use crate::{DbError, DbErrorKind};
use crate::filter::{Budget, Cond, Filter, compare, json_eq, resolve};

/// The largest document stored, as JSON.
pub const MAX_DOCUMENT: usize = 4 << 20;
/// The most nested a document may be.
const DEPTH: usize = 64;

/// A new `_id`: 24 hex digits, seconds since the epoch first (as MongoDB's ObjectId sorts).
pub fn new_id() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as u32;
    format!("{secs:08x}{:016x}", fastrand::u64(..))
}

/// The key a document is stored under: its `_id` as canonical JSON text.
pub fn id_key(id: &Value) -> Result<String, DbError> {
    match id {
        Value::String(s) if !s.is_empty() && s.len() <= 512 => Ok(Value::String(s.clone()).to_string()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(DbError::bad("_id is a non-empty string (at most 512 bytes) or a number")),
    }
}

/// A JSON integer (up to 64 bits, signed or not) as itself.
fn int_of(n: &serde_json::Number) -> Option<i128> {
    n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from))
}

/// Every key a document whose `_id` equals `id` may be stored under, its own first: a number
/// is stored as it was written, so `1` and `1.0` (or `1e19` and 10000000000000000000) are one
/// `_id` under two keys.
pub fn id_keys(id: &Value) -> Result<Vec<String>, DbError> {
    let own = id_key(id)?;
    let Value::Number(n) = id else { return Ok(vec![own]) };
    let mut forms = Vec::with_capacity(3);
    if n.is_f64() {
        // A double that is an integer of 64 bits, written as one.
        let f = n.as_f64().unwrap_or(0.5);
        if f.fract() == 0.0 && f >= -(2f64.powi(63)) && f < 2f64.powi(64) {
            forms.push(if f < 0.0 { (f as i64).to_string() } else { (f as u64).to_string() });
        }
    } else if let Some(d) = n.as_f64().and_then(serde_json::Number::from_f64).filter(|d| crate::filter::num_cmp(n, d).is_eq()) {
        // An integer a double holds exactly, written as a double.
        forms.push(d.to_string());
    }
    // Zero is written three ways.
    if n.as_f64() == Some(0.0) {
        forms.extend(["0", "0.0", "-0.0"].map(String::from));
    }
    let mut keys = vec![own];
    for form in forms {
        if !keys.contains(&form) {
            keys.push(form);
        }
    }
    Ok(keys)
}

/// Checks a document to be stored and gives it an `_id` when it has none; its `_id` key.
pub fn prepare(doc: &mut Value) -> Result<String, DbError> {
    prepare_sized(doc).map(|(id, _)| id)
}

/// As [`prepare`], with the document's size in bytes.
pub fn prepare_sized(doc: &mut Value) -> Result<(String, usize), DbError> {
    let Some(o) = doc.as_object_mut() else { return Err(DbError::bad("a document is a JSON object")) };
    if !o.contains_key("_id") {
        // `_id` first, as MongoDB stores it.
        let mut with_id = Map::with_capacity(o.len() + 1);
        with_id.insert("_id".into(), Value::String(new_id()));
        with_id.extend(std::mem::take(o));
        *o = with_id;
    }
    check_fields(doc, 0)?;
    let size = serde_json::to_vec(doc).map(|b| b.len()).unwrap_or(usize::MAX);
    if size > MAX_DOCUMENT {
        return Err(DbError::bad(format!("the document is {size} bytes; at most {MAX_DOCUMENT}")));
    }
    Ok((id_key(&doc["_id"])?, size))
}

/// Refuses a field path (`a.b.c`) of more parts than a document may nest: an update builds
/// one level per part, and a value nested past what is dropped safely never gets made.
fn check_path(what: &str, path: &str) -> Result<(), DbError> {
    if path.split('.').nth(DEPTH).is_some() {
        return Err(DbError::bad(format!("{what}: a field path has at most {DEPTH} parts")));
    }
    Ok(())
}

/// The most fields one sort names (as MongoDB's).
const MAX_SORT_FIELDS: usize = 32;
/// The most fields one projection names.
const MAX_PROJECTED: usize = 256;

fn check_fields(v: &Value, depth: usize) -> Result<(), DbError> {
    if depth > DEPTH {
        return Err(DbError::bad("the document is nested too deeply"));
    }
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                if k.starts_with('$') || k.contains('.') || k.is_empty() {
                    return Err(DbError::bad(format!("field name {k:?}: not empty, no leading $ and no dot")));
                }
                check_fields(v, depth + 1)?;
            }
            Ok(())
        }
        Value::Array(a) => a.iter().try_for_each(|v| check_fields(v, depth + 1)),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone)]
pub enum Change {
    Set(String, Value),
    Unset(String),
    Inc(String, f64, Value),
    Push(String, Vec<Value>),
    Pull(String, Cond),
}

/// An update document: operators only (a replacement goes through `replaceOne`).
#[derive(Debug, Clone)]
pub struct Update(Vec<Change>);

impl Update {
    pub fn parse(v: &Value) -> Result<Update, DbError> {
        let Some(o) = v.as_object().filter(|o| !o.is_empty()) else { return Err(DbError::bad("an update is a non-empty object of operators")) };
        // The conditions of every `$pull` together, as one filter's.
        if let Some(pull) = o.get("$pull")
            && crate::filter::regexes_in(pull) > crate::filter::MAX_REGEXES
        {
            return Err(DbError::bad(format!("an update's $pull has at most {} $regex", crate::filter::MAX_REGEXES)));
        }
        let mut changes = Vec::new();
        for (op, fields) in o {
            match op.as_str() {
                "$set" | "$unset" | "$inc" | "$push" | "$pull" => {}
                other if other.starts_with('$') => return Err(DbError::bad(format!("unknown or unsupported update operator {other}"))),
                _ => return Err(DbError::bad("an update holds operators ($set, $unset, $inc, $push, $pull); use replaceOne to replace a document")),
            }
            let Some(fields) = fields.as_object() else { return Err(DbError::bad(format!("{op} takes an object of fields"))) };
            for (path, arg) in fields {
                if path.is_empty() || path.split('.').any(|p| p.is_empty() || p.starts_with('$')) {
                    return Err(DbError::bad(format!("{op}: {path:?} is not a field path")));
                }
                if path == "_id" || path.starts_with("_id.") {
                    return Err(DbError::bad("_id cannot be changed"));
                }
                check_path(op, path)?;
                changes.push(match op.as_str() {
                    "$set" => Change::Set(path.clone(), arg.clone()),
                    "$unset" => Change::Unset(path.clone()),
                    "$inc" => Change::Inc(path.clone(), arg.as_f64().ok_or_else(|| DbError::bad(format!("$inc: {path} takes a number")))?, arg.clone()),
                    "$push" => Change::Push(path.clone(), match arg.as_object().and_then(|o| o.get("$each")) {
                        // Modifiers beside $each ($slice, $sort, $position) would change what is
                        // stored: refused, never ignored.
                        Some(_) if arg.as_object().is_some_and(|o| o.len() > 1) => {
                            let others: Vec<&str> = arg.as_object().into_iter().flat_map(|o| o.keys()).map(String::as_str).filter(|k| *k != "$each").collect();
                            return Err(DbError::bad(format!("$push: only $each is supported, not {}", others.join(", "))));
                        }
                        Some(Value::Array(each)) => each.clone(),
                        Some(_) => return Err(DbError::bad("$push: $each takes an array")),
                        None => vec![arg.clone()],
                    }),
                    "$pull" => Change::Pull(path.clone(), match arg {
                        Value::Object(o) if o.keys().next().is_some_and(|k| k.starts_with('$')) => match Filter::parse(&serde_json::json!({"v": arg}))? {
                            Filter::Field(_, c) => c,
                            _ => return Err(DbError::bad("$pull: a condition on the elements")),
                        },
                        other => Cond::Eq(other.clone()),
                    }),
                    _ => unreachable!("operators are checked above"),
                });
            }
        }
        Ok(Update(changes))
    }

    /// Applies the update; whether the document changed.
    pub fn apply(&self, doc: &mut Value) -> Result<bool, DbError> {
        self.apply_within(doc, &mut Budget::unlimited())
    }

    /// [`Update::apply`], its `$pull` conditions spending `budget`: a timeout once it is spent.
    pub fn apply_within(&self, doc: &mut Value, budget: &mut Budget) -> Result<bool, DbError> {
        let before = doc.clone();
        for c in &self.0 {
            match c {
                Change::Set(p, v) => *slot(doc, p)? = v.clone(),
                Change::Unset(p) => unset(doc, p),
                Change::Inc(p, by, raw) => {
                    let s = slot(doc, p)?;
                    *s = match s {
                        Value::Null => raw.clone(),
                        // Integers add exactly; a sum past 64 bits is refused, as MongoDB does.
                        Value::Number(n) if int_of(n).is_some() && raw.as_number().and_then(int_of).is_some() => {
                            let sum = int_of(n).unwrap_or(0) + raw.as_number().and_then(int_of).unwrap_or(0);
                            match (i64::try_from(sum), u64::try_from(sum)) {
                                (Ok(i), _) => Value::from(i),
                                (_, Ok(u)) => Value::from(u),
                                _ => return Err(DbError::bad(format!("$inc: {p} would pass what a 64-bit integer holds"))),
                            }
                        }
                        Value::Number(n) => serde_json::Number::from_f64(n.as_f64().unwrap_or(0.0) + by).map(Value::Number).ok_or_else(|| DbError::bad("$inc: the result is not a finite number"))?,
                        _ => return Err(DbError::bad(format!("$inc: {p} is not a number"))),
                    };
                }
                Change::Push(p, vs) => {
                    let s = slot(doc, p)?;
                    if s.is_null() {
                        *s = Value::Array(Vec::new());
                    }
                    let Some(a) = s.as_array_mut() else { return Err(DbError::bad(format!("$push: {p} is not an array"))) };
                    a.extend(vs.iter().cloned());
                }
                Change::Pull(p, cond) => {
                    if let Some(Value::Array(a)) = existing_mut(doc, p) {
                        a.retain(|e| !cond.matches(&[e], budget));
                        if budget.spent() {
                            return Err(DbError { kind: DbErrorKind::Timeout, message: "the update ran past the query's time".into() });
                        }
                    }
                }
            }
        }
        check_fields(doc, 0)?;
        Ok(!json_eq(&before, doc))
    }
}


/// The value at `path`, made (with the objects on the way) when it is not there.
fn slot<'a>(doc: &'a mut Value, path: &str) -> Result<&'a mut Value, DbError> {
    let mut here = doc;
    for part in path.split('.') {
        here = match here {
            Value::Object(o) => o.entry(part.to_string()).or_insert(Value::Null),
            Value::Array(a) => match part.parse::<usize>() {
                Ok(i) if i < a.len() => &mut a[i],
                _ => return Err(DbError::bad(format!("{path}: {part} is not an index of the array"))),
            },
            Value::Null => {
                *here = Value::Object(Map::new());
                here.as_object_mut().expect("an object").entry(part.to_string()).or_insert(Value::Null)
            }
            _ => return Err(DbError::bad(format!("{path}: cannot set a field inside a {}", kind(here)))),
        };
    }
    Ok(here)
}

fn existing_mut<'a>(doc: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    let mut here = doc;
    for part in path.split('.') {
        here = match here {
            Value::Object(o) => o.get_mut(part)?,
            Value::Array(a) => a.get_mut(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(here)
}

fn unset(doc: &mut Value, path: &str) {
    let (parent, last) = match path.rsplit_once('.') {
        Some((p, l)) => (existing_mut(doc, p), l),
        None => (Some(doc), path),
    };
    if let Some(Value::Object(o)) = parent {
        o.shift_remove(last);
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A sort: fields with 1 or -1.
pub fn parse_sort(v: Option<&Value>) -> Result<Vec<(String, bool)>, DbError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let o = v.as_object().ok_or_else(|| DbError::bad("sort is an object of fields with 1 or -1"))?;
    if o.len() > MAX_SORT_FIELDS {
        return Err(DbError::bad(format!("sort: at most {MAX_SORT_FIELDS} fields")));
    }
    o.iter()
        .map(|(k, d)| match d.as_i64() {
            Some(1) => Ok((k.clone(), true)),
            Some(-1) => Ok((k.clone(), false)),
            _ => Err(DbError::bad(format!("sort: {k} takes 1 or -1"))),
        })
        .collect()
}

/// Sorts `docs` by the fields `by`; false when it ran past `deadline` (the order is then
/// partial).
pub fn sort(docs: &mut [Value], by: &[(String, bool)], deadline: Instant) -> bool {
    sort_by(docs, |d| d, by, deadline)
}

/// Sorts `items` by the fields `by` of the document each holds (stable: ties keep their
/// order), reading each item's values of the fields once and copying none of them. Comparing
/// deep values takes time: past `deadline` it stops and answers false (the items are then as
/// they were).
pub fn sort_by<T>(items: &mut [T], doc: impl Fn(&T) -> &Value, by: &[(String, bool)], deadline: Instant) -> bool {
    static NULL: Value = Value::Null;
    if by.is_empty() {
        return true;
    }
    let order = {
        let keys: Vec<Vec<&Value>> = items.iter().map(|t| by.iter().map(|(p, _)| resolve(doc(t), p).first().copied().unwrap_or(&NULL)).collect()).collect();
        let mut compared = 0u32;
        let cmp = |a: usize, b: usize| -> Option<std::cmp::Ordering> {
            compared = compared.wrapping_add(1);
            if compared.is_multiple_of(64) && Instant::now() > deadline {
                return None;
            }
            Some(keys[a].iter().zip(&keys[b]).zip(by).map(|((x, y), (_, up))| if *up { compare(x, y) } else { compare(x, y).reverse() }).find(|o| o.is_ne()).unwrap_or(std::cmp::Ordering::Equal))
        };
        match merge_sort(items.len(), cmp) {
            Some(order) => order,
            None => return false,
        }
    };
    permute(items, &order);
    true
}

/// The indexes `0..n` in the order `cmp` gives them, ties in index order (a bottom-up merge
/// sort); `None` as soon as `cmp` answers none. A sort of our own, because one that stops
/// half way cannot be had from the standard sorts, which may panic when a comparison changes
/// its mind.
fn merge_sort(n: usize, mut cmp: impl FnMut(usize, usize) -> Option<std::cmp::Ordering>) -> Option<Vec<usize>> {
    let mut a: Vec<usize> = (0..n).collect();
    let mut b = vec![0; n];
    let mut width = 1;
    while width < n {
        for start in (0..n).step_by(2 * width) {
            let (mid, end) = ((start + width).min(n), (start + 2 * width).min(n));
            let (mut i, mut j, mut k) = (start, mid, start);
            while i < mid && j < end {
                // The right one goes first only when it is strictly less: stable.
                if cmp(a[j], a[i])? == std::cmp::Ordering::Less {
                    b[k] = a[j];
                    j += 1;
                } else {
                    b[k] = a[i];
                    i += 1;
                }
                k += 1;
            }
            b[k..k + (mid - i)].copy_from_slice(&a[i..mid]);
            k += mid - i;
            b[k..k + (end - j)].copy_from_slice(&a[j..end]);
        }
        std::mem::swap(&mut a, &mut b);
        width *= 2;
    }
    Some(a)
}

/// Puts at each position `i` the item that was at `order[i]`, a cycle at a time: each item
/// moves once.
fn permute<T>(items: &mut [T], order: &[usize]) {
    let mut placed = vec![false; order.len()];
    for start in 0..order.len() {
        let mut i = start;
        while !placed[i] {
            placed[i] = true;
            let from = order[i];
            if from == start {
                break;
            }
            items.swap(i, from);
            i = from;
        }
    }
}

/// A projection: fields to keep (1) or to leave out (0), never both but for `_id`.
#[derive(Debug, Clone, Default)]
pub struct Projection {
    fields: Vec<String>,
    include: bool,
    id: bool,
}

impl Projection {
    pub fn parse(v: Option<&Value>) -> Result<Option<Projection>, DbError> {
        let Some(v) = v else { return Ok(None) };
        let o = v.as_object().ok_or_else(|| DbError::bad("projection is an object of fields with 1 or 0"))?;
        if o.len() > MAX_PROJECTED {
            return Err(DbError::bad(format!("projection: at most {MAX_PROJECTED} fields")));
        }
        let mut p = Projection { fields: Vec::new(), include: false, id: true };
        let mut modes = Vec::new();
        for (k, flag) in o {
            let on = match flag {
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => return Err(DbError::bad(format!("projection: {k} takes 1 or 0"))),
            };
            if k == "_id" {
                p.id = on;
                continue;
            }
            check_path("projection", k)?;
            modes.push(on);
            p.fields.push(k.clone());
        }
        if modes.iter().any(|m| *m) && modes.iter().any(|m| !*m) {
            return Err(DbError::bad("projection: either fields to keep or fields to leave out, not both"));
        }
        p.include = modes.first().copied().unwrap_or(false);
        Ok(Some(p))
    }

    pub fn apply(&self, doc: Value) -> Value {
        let Value::Object(mut o) = doc else { return doc };
        if self.include {
            Value::Object(self.kept(&o))
        } else {
            let mut doc = Value::Object(std::mem::take(&mut o));
            for f in &self.fields {
                unset(&mut doc, f);
            }
            if !self.id {
                unset(&mut doc, "_id");
            }
            doc
        }
    }
}

impl Projection {
    /// What an inclusion keeps of object `o`, copying only what it keeps: a dotted path's
    /// levels are read in place, never copied whole on the way down.
    fn kept(&self, o: &Map<String, Value>) -> Map<String, Value> {
        let mut out = Map::new();
        for (k, v) in o {
            if (k == "_id" && self.id) || self.fields.iter().any(|f| f == k) {
                out.insert(k.clone(), v.clone());
            } else if let Some(nested) = nested_include(&self.fields, k, v) {
                out.insert(k.clone(), nested);
            }
        }
        out
    }
}

/// The parts of object `v` (field `k`) that dotted inclusions (`k.sub`) keep.
fn nested_include(fields: &[String], k: &str, v: &Value) -> Option<Value> {
    let subs: Vec<String> = fields.iter().filter_map(|f| f.strip_prefix(k).and_then(|r| r.strip_prefix('.')).map(str::to_string)).collect();
    if subs.is_empty() {
        return None;
    }
    let inner = Projection { fields: subs, include: true, id: false };
    v.as_object().map(|o| Value::Object(inner.kept(o)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn updated(doc: Value, update: Value) -> Value {
        let mut d = doc;
        Update::parse(&update).unwrap().apply(&mut d).unwrap();
        d
    }

    #[test]
    fn an_id_number_has_a_key_for_each_form_it_is_written_in() {
        let keys = |v: Value| id_keys(&v).unwrap();
        assert_eq!(keys(json!(1)), ["1", "1.0"]);
        assert_eq!(keys(json!(1.0)), ["1.0", "1"]);
        assert_eq!(keys(json!(0)), ["0", "0.0", "-0.0"]);
        assert_eq!(keys(json!(-0.0)), ["-0.0", "0", "0.0"]);
        assert_eq!(keys(json!(0.0)), ["0.0", "0", "-0.0"]);
        assert_eq!(keys(json!(-7.0)), ["-7.0", "-7"]);
        assert_eq!(keys(json!(2.5)), ["2.5"]);
        // No double is 2^53 + 1; 2^64 is no integer of 64 bits.
        assert_eq!(keys(json!(9007199254740993u64)), ["9007199254740993"]);
        assert_eq!(keys(json!(1e19)), ["1e+19", "10000000000000000000"]);
        assert_eq!(keys(json!(10000000000000000000u64)), ["10000000000000000000", "1e+19"]);
        assert_eq!(keys(json!(18446744073709551616.0)), ["1.8446744073709552e+19"]);
        assert_eq!(keys(json!("x")), ["\"x\""]);
    }

    #[test]
    fn operators_change_what_they_name() {
        let d = json!({"_id": "1", "a": 1, "b": {"c": 2}, "l": [1, 2, 3, 2]});
        assert_eq!(updated(d.clone(), json!({"$set": {"b.d": "x", "n.m": 1}})), json!({"_id": "1", "a": 1, "b": {"c": 2, "d": "x"}, "l": [1, 2, 3, 2], "n": {"m": 1}}));
        assert_eq!(updated(d.clone(), json!({"$unset": {"b.c": "", "a": 1}})), json!({"_id": "1", "b": {}, "l": [1, 2, 3, 2]}));
        assert_eq!(updated(d.clone(), json!({"$inc": {"a": 2, "z": 1.5}}))["a"], json!(3));
        assert_eq!(updated(d.clone(), json!({"$inc": {"z": 1.5}}))["z"], json!(1.5));
        // Integers add exactly across 64 bits, signed or not; past them is refused.
        let big = json!({"n": 9223372036854775807i64, "u": 18446744073709551615u64});
        assert_eq!(updated(big.clone(), json!({"$inc": {"n": 1}}))["n"], json!(9223372036854775808u64));
        assert_eq!(updated(big.clone(), json!({"$inc": {"u": -1}}))["u"], json!(18446744073709551614u64));
        let mut over = big.clone();
        assert!(Update::parse(&json!({"$inc": {"u": 1}})).unwrap().apply(&mut over).unwrap_err().message.contains("64-bit"));
        assert_eq!(over, big, "a refused increment changes nothing");
        assert_eq!(updated(d.clone(), json!({"$push": {"l": 9, "m": {"$each": [1, 2]}}}))["m"], json!([1, 2]));
        assert_eq!(updated(d.clone(), json!({"$pull": {"l": 2}}))["l"], json!([1, 3]));
        assert_eq!(updated(d, json!({"$pull": {"l": {"$gte": 2}}}))["l"], json!([1]));
    }

    #[test]
    fn bad_updates_are_errors() {
        for (u, says) in [(json!({"$rename": {"a": "b"}}), "$rename"), (json!({"a": 1}), "replaceOne"), (json!({"$set": {"_id": 2}}), "_id"), (json!({"$inc": {"a": "x"}}), "number"), (json!({"$push": {"l": {"$each": [1], "$slice": -2}}}), "only $each is supported, not $slice")] {
            let e = Update::parse(&u).unwrap_err();
            assert!(e.message.contains(says), "{e:?}");
        }
        let mut d = json!({"a": "text"});
        assert!(Update::parse(&json!({"$inc": {"a": 1}})).unwrap().apply(&mut d).is_err());
        // `$pull`'s conditions count their patterns together.
        let pulls = |n: usize| json!({"$pull": (0..n).map(|i| (format!("f{i}"), json!({"$regex": "^a"}))).collect::<Map<String, Value>>()});
        assert!(Update::parse(&pulls(16)).is_ok());
        assert!(Update::parse(&pulls(17)).unwrap_err().message.contains("at most 16 $regex"));
    }

    #[test]
    fn documents_get_ids_and_bad_ones_are_refused() {
        let mut d = json!({"x": 1});
        let key = prepare(&mut d).unwrap();
        assert_eq!(d.as_object().unwrap().keys().next().unwrap(), "_id");
        assert_eq!(key, d["_id"].to_string());
        assert!(prepare(&mut json!([1])).is_err());
        assert!(prepare(&mut json!({"$where": 1})).is_err());
        assert!(prepare(&mut json!({"a.b": 1})).is_err());
        assert!(prepare(&mut json!({"_id": {"x": 1}})).is_err());
    }

    #[test]
    fn projections_and_sorts() {
        let d = json!({"_id": "1", "a": 1, "b": {"c": 2, "d": 3}});
        assert_eq!(Projection::parse(Some(&json!({"a": 1}))).unwrap().unwrap().apply(d.clone()), json!({"_id": "1", "a": 1}));
        assert_eq!(Projection::parse(Some(&json!({"b.c": 1, "_id": 0}))).unwrap().unwrap().apply(d.clone()), json!({"b": {"c": 2}}));
        assert_eq!(Projection::parse(Some(&json!({"b": 0}))).unwrap().unwrap().apply(d), json!({"_id": "1", "a": 1}));
        assert!(Projection::parse(Some(&json!({"a": 1, "b": 0}))).is_err());
        let mut docs = vec![json!({"n": 2, "s": "a"}), json!({"n": 1, "s": "b"}), json!({"n": 2, "s": "c"})];
        let later = Instant::now() + std::time::Duration::from_secs(60);
        assert!(sort(&mut docs, &parse_sort(Some(&json!({"n": -1, "s": 1}))).unwrap(), later));
        assert_eq!(docs.iter().map(|d| d["s"].as_str().unwrap()).collect::<String>(), "acb");
    }

    /// Sorting moves every item where a stable sort by its key puts it, for any order the
    /// items come in.
    #[test]
    fn a_sort_is_a_stable_sort_of_the_items_themselves() {
        let later = Instant::now() + std::time::Duration::from_secs(60);
        let by = parse_sort(Some(&json!({"k": 1}))).unwrap();
        for round in 0..200u64 {
            let mut rng = fastrand::Rng::with_seed(round);
            let n = rng.usize(0..40);
            let mut items: Vec<(usize, Value)> = (0..n).map(|i| (i, json!({"k": rng.u8(0..6)}))).collect();
            let mut want = items.clone();
            want.sort_by_key(|(_, d)| d["k"].as_u64());
            assert!(sort_by(&mut items, |(_, d)| d, &by, later));
            assert_eq!(items.iter().map(|(i, _)| *i).collect::<Vec<_>>(), want.iter().map(|(i, _)| *i).collect::<Vec<_>>(), "round {round}");
        }
        // One long cycle (the last item first, the others after it in order): each item
        // moves once.
        let n = 20_000;
        let mut docs: Vec<Value> = (0..n).map(|i| json!({"k": if i == n - 1 { -1 } else { i }})).collect();
        assert!(sort(&mut docs, &by, later));
        assert!(docs[0]["k"] == -1 && docs.windows(2).all(|w| w[0]["k"].as_i64() < w[1]["k"].as_i64()));
        // Past its deadline it stops comparing, leaves the items as they were and says so.
        let mut docs: Vec<Value> = (0..500).rev().map(|i| json!({"k": i})).collect();
        assert!(!sort(&mut docs, &by, Instant::now()));
        assert_eq!(docs[0]["k"], 499);
    }
}
