//! The L7 engine: receives the flows the kernel redirects (verdict L7), detects their protocol and
//! applies routes and traffic policy. Reads `state`; never imports `control` or aya.
pub mod balance;
pub mod breaker;
pub mod budget;
pub mod outlier;
pub mod ratelimit;
pub mod route;
