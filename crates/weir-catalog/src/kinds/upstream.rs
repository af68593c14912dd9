//! `upstreams`: the nodes requests go to, how they are balanced and checked.

use serde_json::{Map, Value};
use weir_core::model::Upstream;
use weir_tls::Keyring;

use crate::defs::{check_upstream, upstream_schema};
use crate::{Kind, Reference, read_as};

use super::CLIENT_CERT;

pub struct Upstreams;

impl Kind for Upstreams {
    fn name(&self) -> &'static str {
        "upstreams"
    }

    fn noun(&self) -> &'static str {
        "upstream"
    }

    fn schema(&self) -> &Value {
        static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
        SCHEMA.get_or_init(upstream_schema)
    }

    fn allows_post(&self) -> bool {
        true
    }

    fn references(&self) -> &'static [Reference] {
        &[CLIENT_CERT]
    }

    fn check(&self, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        check_upstream("", value, &mut errors);
        errors
    }

    fn read(&self, value: &Value) -> Result<(), String> {
        read_as::<Upstream>(value)
    }

    /// The client certificate's key is checked and sealed like a certificate's.
    fn seal(&self, obj: &mut Map<String, Value>, keyring: &Keyring) -> Result<(), String> {
        let mut v = Value::Object(std::mem::take(obj));
        let sealed = weir_tls::seal_upstream_key(keyring, &mut v, "");
        let Value::Object(o) = v else { unreachable!("put back what was taken") };
        *obj = o;
        sealed
    }
}
