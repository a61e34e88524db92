//! The tilefuse graph-definition DSL (being written).
