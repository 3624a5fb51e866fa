//! SMART App Launch semantics: the scope grammar (and, with the authorization engine and
//! discovery, what scopes mean for requests). No HTTP here.

pub mod capability;
pub mod discovery;
pub mod scope;
