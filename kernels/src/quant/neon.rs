//! The aarch64 tile kernels (filled in below).
