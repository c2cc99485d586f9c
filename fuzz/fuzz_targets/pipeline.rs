//! Arbitrary bytes through Frame Streams → dnstap → DNS, exactly as tapd's socket task drives them.
//! The invariants checked are in `dnsflow_testkit::drive_pipeline` (also run by the property tests).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dnsflow_testkit::drive_pipeline(data);
});
