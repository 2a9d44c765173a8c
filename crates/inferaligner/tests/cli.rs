//! The `inferaligner` binary as a user runs it.

use std::path::PathBuf;
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
}

fn inferaligner() -> Command {
    Command::new(env!("CARGO_BIN_EXE_inferaligner"))
}

#[test]
fn inspect_loads_and_runs_the_fixture() {
    let out = inferaligner()
        .args(["inspect", "--load"])
        .arg(fixture())
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("segments   6 (1 embed + 4 layer + 1 head)"),
        "{stdout}"
    );
    assert!(stdout.contains("all 6 segments ran"), "{stdout}");
}

#[test]
fn a_missing_onnx_runtime_names_the_setup_command() {
    let missing = tempfile::tempdir().expect("tempdir");
    let out = inferaligner()
        .env("ORT_DYLIB_PATH", missing.path().join("libonnxruntime.so"))
        .args(["inspect", "--load"])
        .arg(fixture())
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ONNX Runtime library not found"),
        "{stderr}"
    );
    assert!(stderr.contains("make setup"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn generate_streams_the_greedy_answer() {
    let out = inferaligner()
        .args(["generate", "--model"])
        .arg(fixture())
        .args([
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "8",
        ])
        .args(["--ignore-eos", "--threads", "1"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("8 generated tokens"), "{stderr}");
    assert!(!out.stdout.is_empty());
}

#[test]
fn generate_with_an_over_long_prompt_is_a_clear_error() {
    let out = inferaligner()
        .args(["generate", "--model"])
        .arg(fixture())
        .args(["--raw", "--prompt", &"word ".repeat(400)])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("context length"), "{stderr}");
}
