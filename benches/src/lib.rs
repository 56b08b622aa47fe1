//! ringkv-bench: benchmark drivers that print numbers (never pass/fail), used by
//! `ringkv bench ...`, and criterion micro-benches under benches/.

pub mod engine;
pub mod load;
pub mod report;
