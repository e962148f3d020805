//! Bindings of every supported version of the plugin contract, one module per version (frozen
//! like the WIT folders they come from).

pub mod since_v0_1_0;
pub mod since_v0_2_0;
