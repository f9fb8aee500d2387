//! Six-site synthetic T2-weighted prostate MR phantom (see shared design phantom-sites.md).
