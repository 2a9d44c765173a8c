//! End-to-end tests: the Rust runtime over the committed tiny fixture, against golden values
//! computed by the numpy reference.

mod batch;
mod choices;
mod export;
mod fuzz;
mod gate_batch;
mod gate_readout;
mod gate_view;
mod generation;
mod logprobs;
mod memory;
mod passthrough;
mod prefix;
mod prompt_logprobs;
mod responses;
mod server;
mod smollm2;
mod structured;
mod tools;
