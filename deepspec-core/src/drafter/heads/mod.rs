//! The heads on top of the DSpark backbone: sequential (Markov) heads and the confidence head.

pub mod confidence;
pub mod markov;

pub use confidence::ConfidenceHead;
pub use markov::MarkovHead;
