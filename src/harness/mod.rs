//! Process harnesses shared by the demo (`desam demo`) and the integration tests: a real Orthanc on
//! free loopback ports, configured, started, queried and stopped. Uses the crate's one HTTP client.

pub mod orthanc;

pub use orthanc::{free_port, HarnessError, OrthancProcess, ORTHANC_EXE};
