//! `nodeproxy::fuzz::request_head` on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nodeproxy::fuzz::request_head(data));
