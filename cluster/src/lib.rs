//! ringkv-cluster: sans-IO distributed logic (see issue 5).
