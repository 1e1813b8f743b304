//! Rendezvous key-value store (to be implemented).
