//! TCP ring backend (to be implemented).
