//! `vars` expressions: any JSON either compiles or is refused, and a compiled expression
//! evaluates against any variables without panicking.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use weir_core::expr::{Expr, Vars};

/// Variables whose values come from the input too.
struct Given<'a>(&'a str);

impl Vars for Given<'_> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        (name.len() % 3 != 0).then(|| Cow::Borrowed(self.0))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((rule, value)) = std::str::from_utf8(data).ok().and_then(|s| s.split_once('\n')) else { return };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(rule) else { return };
    if let Ok(expr) = Expr::compile(&json) {
        let _ = expr.eval(&Given(value));
    }
});
