//! ringkv-proto: wire formats shared by the server and the client (see issue 3).
