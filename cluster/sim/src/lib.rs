//! ringkv-sim: the deterministic simulator (see issue 5).
