//! The chaos tests' judge, which is the product's: see
//! [`kvcheck::linearizability`].

pub use kvcheck::linearizability::*;
