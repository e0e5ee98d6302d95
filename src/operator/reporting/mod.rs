//! What the operator says about what it did: Kubernetes [`events`] on our objects, and the JSON
//! [`audit`] trail on stdout. Called by the controllers; calls nothing of theirs.

pub mod audit;
pub mod events;
