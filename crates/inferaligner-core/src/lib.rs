//! The InferAligner steering core: safety related vectors, the guidance gate, steering packs
//! and policies.
//!
//! Pure computation plus reading and writing pack files. It must not depend on tokio, hyper or
//! ONNX Runtime: the runtime and the proxy depend on it, never the other way round.
//!
//! The math (SRV/SSV, bias, gate, layer choice) and the pack format arrive with the steering
//! work; until then this crate only fixes its place in the dependency graph.
