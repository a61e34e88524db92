//! The `tilefuse` command line.

fn main() {}
