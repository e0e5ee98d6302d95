//! What reconciles read instead of asking the apiserver: the shared [`context`] (client, caches,
//! keys, a little memory of our own writes), the [`watches`] that fill the caches, the compressed
//! [`grant_cache`], the dependency [`index`], the [`interner`], compact [`ids`], what the caches keep
//! of metadata ([`prune`]), the compact [`secret_cache`] and the stamping policies ([`stamps`]).
//! Read by the controllers; written only by the watches and by the controllers' own write records.

pub mod context;
pub mod grant_cache;
pub mod ids;
pub mod index;
pub mod interner;
pub mod prune;
pub mod secret_cache;
pub mod stamps;
pub mod watches;
