//! `nodeproxy::fuzz::chunked` on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nodeproxy::fuzz::chunked(data));
