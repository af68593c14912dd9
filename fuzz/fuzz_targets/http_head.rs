//! The client-side HTTP/1.1 head parser and the path normalization behind it: any bytes are
//! either a request the lean loop serves, a partial head, or left to hyper; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weir_http::front::fuzz_head(data);
});
