//! The Orthanc plugin: entry points, the cxx bridge to the C++ shim, configuration, worker and jobs.
