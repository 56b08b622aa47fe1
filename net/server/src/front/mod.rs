//! The client-facing side of a shard: the Redis protocol ([`resp`], with its command
//! table in [`commands`]) and the native protocol ([`native`]), both served by the one
//! pipelined connection loop in [`pipelined`], and the data operations they share
//! ([`ops`]). [`connections`] bounds and tracks open connections; [`pipeline`] decides
//! which requests of a pipeline may run side by side.

pub mod commands;
pub mod connections;
pub mod native;
pub mod ops;
pub mod pipeline;
pub mod pipelined;
pub mod resp;
pub mod unordered;
