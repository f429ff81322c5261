pub mod bench;
pub mod cache;
pub mod generate;
pub mod pending;
pub mod prepare;
