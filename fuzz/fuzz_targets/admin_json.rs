//! What the Admin API does with a body: parse it, check it as every kind of object (schema,
//! cross-field checks, the data plane's typed read, nesting bound), and normalize a request
//! path. Nothing may panic or overflow the stack, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_catalog::Catalog;
use weir_core::schema::{self, NoPlugins};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(normal) = weir_core::path::normalize(text)
    {
        // One normal form per path: normalizing it again changes nothing.
        assert_eq!(weir_core::path::normalize(&normal.encoded).as_ref(), Ok(&normal), "{text:?}");
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let _ = schema::depth(&value);
    static CATALOG: std::sync::OnceLock<Catalog> = std::sync::OnceLock::new();
    let catalog = CATALOG.get_or_init(Catalog::apisix);
    for kind in catalog.kinds() {
        let _ = catalog.check(kind, &value, &NoPlugins);
    }
});
