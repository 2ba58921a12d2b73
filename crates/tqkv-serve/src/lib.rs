//! # tqkv-serve — an OpenAI-compatible server over tqkv's quantized KV caches
//!
//! `tqkv serve` is this crate: [`pool`] counts every sequence's KV bytes against one budget in
//! fixed-size tiles, [`engine`] runs the requests with continuous batching and admission by free
//! tiles (preemption by recomputation when the pool runs out), [`api`] and [`http`] speak
//! OpenAI's API over axum. The smaller a cache kind stores a token, the more sequences the same
//! `--kv-memory` holds at once — docs/SERVING.md measures how many.
#![warn(missing_docs)]

pub mod api;
pub mod engine;
pub mod http;
pub mod pool;

pub use engine::{start, EngineConfig, EngineHandle, Event, Finish, GenParams, Request};
pub use http::{router, serve, AppState};
pub use pool::{parse_bytes, CostCurve, KvPool, PoolError};
