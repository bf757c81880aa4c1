//! `nodeproxy::fuzz::response_head` on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nodeproxy::fuzz::response_head(data));
