//! Integration tests: one binary, shared helpers in `util`.

mod util;

mod cli;
mod jwks;
mod revocation;
mod verify;
