//! ringkv-engine
