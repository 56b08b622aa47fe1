//! ringkv-bench: benchmark drivers.
