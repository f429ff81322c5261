pub mod bench;
pub mod cache;
pub mod datasets;
pub mod eval;
pub mod export;
pub mod generate;
pub mod prepare;
pub mod train;
