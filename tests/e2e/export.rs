//! Loading a layer-split export with real ONNX Runtime sessions.

use std::path::Path;
use std::sync::Arc;

use inferaligner::steering::Steering;
use inferaligner_core::{Policy, SteeringPack};
use inferaligner_e2e::{golden, max_abs_diff, tiny_llama, tiny_llama_aligned, tiny_llama_fused};
use inferaligner_runtime::{
    ExecutionProvider, LayerSplitModel, Manifest, RowContext, RuntimeError, SessionOptions,
};

const TOL: f32 = 1e-4;

fn options() -> SessionOptions {
    SessionOptions {
        intra_op_threads: 1,
        ..SessionOptions::default()
    }
}

#[test]
fn fixture_reproduces_golden_logits_and_residuals() {
    for dir in [tiny_llama(), tiny_llama_fused()] {
        reproduces_golden(&dir);
    }
}

/// One pass, and chunks of 3 tokens on top of the cache, give the numpy reference's values.
fn reproduces_golden(dir: &Path) {
    let mut model = LayerSplitModel::load(dir, &options()).expect("fixture loads");
    let golden = golden(dir);
    assert_eq!(golden.seed, 1);
    for case in &golden.cases {
        let ids: Vec<u32> = case.input_ids.iter().map(|&t| t as u32).collect();
        let chunked = model
            .prefill_prompt(&ids, 3, None, RowContext::default(), None, None)
            .expect("runs")
            .expect("no gate");
        let d = max_abs_diff(
            chunked.logits.row(0).as_slice().expect("row"),
            &case.last_logits,
        );
        assert!(d <= TOL, "{}: chunked logits differ by {d}", dir.display());
        let out = model.prefill(&case.input_ids).expect("prefill runs");
        assert_eq!(out.depths, vec![0, 1, 2, 3, 4]);
        let d = max_abs_diff(&out.last_logits, &case.last_logits);
        assert!(d <= TOL, "{:?}: logits differ by {d}", case.question);
        assert_eq!(out.last_residuals.len(), case.last_residuals.len());
        for (layer, (got, want)) in out
            .last_residuals
            .iter()
            .zip(&case.last_residuals)
            .enumerate()
        {
            let d = max_abs_diff(got, want);
            assert!(
                d <= TOL,
                "{:?}: residual {layer} differs by {d}",
                case.question
            );
        }
    }
}

#[test]
fn aligned_sibling_has_the_same_shape_but_other_weights() {
    let target = Manifest::load(tiny_llama()).expect("target manifest");
    let sibling = Manifest::load(tiny_llama_aligned()).expect("sibling manifest");
    assert_eq!(target.hidden_size, sibling.hidden_size);
    assert_eq!(target.num_layers, sibling.num_layers);
    assert_eq!(target.tokenizer.sha256, sibling.tokenizer.sha256);
    assert_ne!(target.source["sha256"], sibling.source["sha256"]);

    let ids = &golden(&tiny_llama()).cases[0].input_ids;
    let mut a = LayerSplitModel::load(tiny_llama(), &options()).expect("target loads");
    let mut b = LayerSplitModel::load(tiny_llama_aligned(), &options()).expect("sibling loads");
    let (ra, rb) = (a.prefill(ids).expect("runs"), b.prefill(ids).expect("runs"));
    assert!(max_abs_diff(&ra.last_residuals[2], &rb.last_residuals[2]) > 0.1);
}

/// Copy the fixture into a temporary directory so a test can break it.
fn copy_fixture() -> tempfile::TempDir {
    copy_export(&tiny_llama())
}

fn copy_export(export: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(export).expect("fixture dir") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
    }
    dir
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut m);
    std::fs::write(&path, serde_json::to_string(&m).expect("json")).expect("write");
}

#[test]
fn a_segment_from_another_export_is_refused() {
    let dir = copy_fixture();
    std::fs::copy(
        tiny_llama_aligned().join("layer_2.onnx"),
        dir.path().join("layer_2.onnx"),
    )
    .expect("swap layer");
    let err = Manifest::load(dir.path()).expect_err("hash mismatch");
    assert!(matches!(err, RuntimeError::HashMismatch { .. }), "{err}");
    assert!(err.to_string().contains("layer_2.onnx"), "{err}");
}

#[test]
fn weights_from_another_export_or_none_are_refused() {
    // the graphs keep their weights beside them (ONNX external data): those files are checked too
    let dir = copy_fixture();
    std::fs::copy(
        tiny_llama_aligned().join("layer_2.onnx.data"),
        dir.path().join("layer_2.onnx.data"),
    )
    .expect("swap weights");
    let err = Manifest::load(dir.path()).expect_err("hash mismatch");
    assert!(matches!(err, RuntimeError::HashMismatch { .. }), "{err}");
    assert!(err.to_string().contains("layer_2.onnx.data"), "{err}");
    std::fs::remove_file(dir.path().join("layer_2.onnx.data")).expect("remove");
    let err = Manifest::load(dir.path()).expect_err("missing file");
    assert_eq!(err.kind().as_str(), "io");
    assert!(err.to_string().contains("layer_2.onnx.data"), "{err}");
    // an export of before the weights' sha256 was recorded: there, and not checked
    let dir = copy_fixture();
    edit_manifest(dir.path(), |m| {
        for s in m["segments"].as_array_mut().expect("segments") {
            s.as_object_mut()
                .expect("a segment")
                .remove("external_data_sha256");
        }
    });
    Manifest::load(dir.path()).expect("loads");
    std::fs::remove_file(dir.path().join("head.onnx.data")).expect("remove");
    let err = Manifest::load(dir.path()).expect_err("missing file");
    assert!(err.to_string().contains("head.onnx.data"), "{err}");
}

#[test]
fn a_missing_segment_is_a_clear_error() {
    let dir = copy_fixture();
    std::fs::remove_file(dir.path().join("layer_1.onnx")).expect("remove");
    let err = Manifest::load(dir.path()).expect_err("missing file");
    assert_eq!(err.kind().as_str(), "io");
    assert!(err.to_string().contains("layer_1.onnx"), "{err}");
}

#[test]
fn inconsistent_manifests_are_refused() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit); 4] = [
        ("format", |m| m["format"] = "inferaligner.export/v9".into()),
        ("cover", |m| m["num_layers"] = 5.into()),
        ("start at layer", |m| {
            m["segments"][2]["layers"] = serde_json::json!([2, 2]);
        }),
        ("KV tensor name", |m| {
            m["segments"][1]["inputs"]["past_key"] = serde_json::json!([]);
        }),
    ];
    for (needle, edit) in cases {
        let dir = copy_fixture();
        edit_manifest(dir.path(), edit);
        let err = Manifest::load(dir.path()).expect_err(needle);
        assert_eq!(err.kind().as_str(), "manifest");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
}

#[test]
fn bad_prompts_are_input_errors() {
    let mut model = LayerSplitModel::load(tiny_llama(), &options()).expect("fixture loads");
    let context = model.manifest().context_length;
    let vocab = model.manifest().vocab_size as i64;
    for (ids, needle) in [
        (vec![], "empty"),
        (vec![1; context + 1], "context length"),
        (vec![1, vocab], "outside the vocabulary"),
        (vec![-1], "outside the vocabulary"),
    ] {
        let err = model.prefill(&ids).expect_err(needle);
        assert_eq!(err.kind(), inferaligner_runtime::ErrorKind::Input);
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn tensor_names_that_the_graph_lacks_are_refused_at_load() {
    let dir = copy_fixture();
    edit_manifest(dir.path(), |m| {
        m["segments"][1]["inputs"]["hidden_states"] = "residual".into();
    });
    let err = LayerSplitModel::load(dir.path(), &options()).expect_err("name mismatch");
    assert_eq!(err.kind().as_str(), "manifest");
    assert!(err.to_string().contains("no input \"residual\""), "{err}");
}

#[test]
fn an_unavailable_gpu_provider_fails_unless_cpu_fallback_is_allowed() {
    // The CPU wheel of ONNX Runtime has no CUDA provider, so registration fails here.
    let cuda = SessionOptions {
        provider: ExecutionProvider::Cuda,
        ..options()
    };
    let err = LayerSplitModel::load(tiny_llama(), &cuda).expect_err("no CUDA here");
    assert_eq!(err.kind().as_str(), "provider");
    assert!(err.to_string().contains("allow_cpu_fallback"), "{err}");

    let fallback = SessionOptions {
        allow_cpu_fallback: true,
        ..cuda
    };
    let mut model = LayerSplitModel::load(tiny_llama(), &fallback).expect("falls back");
    assert!(model.on_cpu_fallback());
    let case = &golden(&tiny_llama()).cases[0];
    let out = model.prefill(&case.input_ids).expect("runs on the CPU");
    assert!(max_abs_diff(&out.last_logits, &case.last_logits) <= TOL);
}

#[test]
fn a_tokenizer_that_differs_from_the_manifest_is_refused() {
    let dir = copy_fixture();
    let path = dir.path().join("tokenizer.json");
    let mut text = std::fs::read_to_string(&path).expect("read");
    text.push('\n');
    std::fs::write(&path, text).expect("write");
    let err = Manifest::load(dir.path()).expect_err("hash mismatch");
    assert!(matches!(err, RuntimeError::HashMismatch { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn an_addend_the_graph_cannot_take_is_refused() {
    let dir = copy_fixture();
    // after a segment's last layer: the residual stream is graph output there already
    edit_manifest(dir.path(), |m| {
        m["segments"][1]["inputs"]["addends"] = serde_json::json!({"0": "addend.0"});
    });
    let err = Manifest::load(dir.path()).expect_err("last layer");
    assert!(
        err.to_string()
            .contains("an addend after layer 0, which is not an inner layer of [0, 0]"),
        "{err}"
    );
    edit_manifest(dir.path(), |m| {
        m["segments"][1]["inputs"]["addends"] = serde_json::json!({"first": "addend.0"});
    });
    let err = Manifest::load(dir.path()).expect_err("not a layer");
    assert!(
        err.to_string().contains("\"first\" is not a layer"),
        "{err}"
    );
    // a manifest that promises an addend its graph does not take
    let dir = copy_export(&inferaligner_e2e::tiny_llama_fused_addends());
    edit_manifest(dir.path(), |m| {
        m["segments"][1]["inputs"]["addends"]["1"] = "addend.one".into();
    });
    let err = LayerSplitModel::load(dir.path(), &SessionOptions::default()).expect_err("input");
    assert!(
        err.to_string()
            .contains("the graph has no input \"addend.one\""),
        "{err}"
    );
}

#[test]
fn an_unsupported_layer_variant_is_a_clear_error() {
    let dir = copy_fixture();
    edit_manifest(dir.path(), |m| {
        m["segments"][1]["variant"] = "grouped".into();
    });
    let err = Manifest::load(dir.path()).expect_err("variant");
    assert_eq!(err.kind().as_str(), "manifest");
    assert!(
        err.to_string().contains("--variant plain or fused"),
        "{err}"
    );
    // a segment that claims the other variant's graph
    edit_manifest(dir.path(), |m| {
        m["segments"][1]["variant"] = "fused".into();
    });
    let err = Manifest::load(dir.path()).expect_err("variant");
    assert!(
        err.to_string().contains("the other variant's inputs"),
        "{err}"
    );
}

#[test]
fn steering_an_inner_layer_of_a_segment_is_refused() {
    // An export whose first segment holds layers 0-2: only layer 2's output is graph I/O.
    let dir = copy_fixture();
    edit_manifest(dir.path(), |m| {
        let segments = m["segments"].as_array_mut().expect("segments");
        segments.drain(2..4);
        let first = &mut segments[1];
        first["layers"] = serde_json::json!([0, 2]);
        for (key, out) in [("past_key", "inputs"), ("past_value", "inputs")]
            .into_iter()
            .chain([("present_key", "outputs"), ("present_value", "outputs")])
        {
            first[out][key] = serde_json::json!([0, 1, 2].map(|l| format!("{key}.{l}")));
        }
    });
    let manifest = Manifest::load(dir.path()).expect("a valid coarser manifest");
    let pack = SteeringPack::load(inferaligner_e2e::sidecar::pack_path()).expect("pack");
    let steering = |layers: Option<Vec<usize>>| Steering {
        pack: Arc::new(pack.clone()),
        policy: Arc::new(Policy {
            layers,
            ..Policy::default()
        }),
    };
    // the fixture pack steers layers 1 and 2 and gates after layer 2
    let err = steering(None)
        .check_layers(&manifest)
        .expect_err("layer 1 is inside");
    assert!(
        err.to_string()
            .contains("steered layer 1 is inside the export's segment of layers 0-2"),
        "{err}"
    );
    steering(Some(vec![2]))
        .check_layers(&manifest)
        .expect("layer 2 ends a segment");
    // the same graphs taking an addend after layer 1 (the serving shape: a boundary at the
    // gate layer, steering inside the graph)
    let addends = Manifest::load(inferaligner_e2e::tiny_llama_fused_addends()).expect("loads");
    assert_eq!(addends.inside_segment(1), Some([0, 2]));
    steering(None)
        .check_layers(&addends)
        .expect("layer 1 takes an addend");
    // the gate reads the residual stream: it needs a boundary
    let mut pack = pack.clone();
    pack.metadata.gate_layer = 1;
    let gated_inside = Steering {
        pack: Arc::new(pack),
        policy: Arc::new(Policy::default()),
    };
    let err = gated_inside
        .check_layers(&addends)
        .expect_err("no boundary after 1");
    assert!(
        err.to_string()
            .contains("gate layer 1 is inside the export's segment of layers 0-2"),
        "{err}"
    );
}

#[test]
fn a_pack_serves_every_export_of_its_model_and_no_other() {
    // calibrated on the plain fixture; the fused graphs of the same weights compute the same
    // residual stream, so the pack gates and steers them as well
    let pack = SteeringPack::load(inferaligner_e2e::sidecar::pack_path()).expect("pack");
    let fingerprint = |dir: &Path| {
        Manifest::load(dir)
            .and_then(|m| m.fingerprint())
            .expect("fingerprint")
    };
    let (plain, fused) = (fingerprint(&tiny_llama()), fingerprint(&tiny_llama_fused()));
    assert_ne!(plain.manifest_sha256, fused.manifest_sha256);
    pack.check_target(&plain).expect("its own export");
    pack.check_target(&fused)
        .expect("the fused export of the same model");
    // the same weights quantized, another checkpoint, or another model: refused
    let dir = copy_fixture();
    edit_manifest(dir.path(), |m| m["weights"] = "int4-block32".into());
    let err = pack
        .check_target(&fingerprint(dir.path()))
        .expect_err("quantized weights compute another stream");
    assert!(err.to_string().contains("calibrate a pack"), "{err}");
    let dir = copy_fixture();
    edit_manifest(dir.path(), |m| {
        m["source"]["sha256"] = "0".repeat(64).into()
    });
    assert!(pack.check_target(&fingerprint(dir.path())).is_err());
    assert!(
        pack.check_target(&fingerprint(&tiny_llama_aligned()))
            .is_err()
    );
}

#[test]
fn a_models_identity_is_stable_across_builds() {
    // Packs record it and are refused by a model with another: a change to how it is computed
    // (e.g. JSON key order, which a dependency's serde_json feature can flip) would orphan
    // every committed pack. Recorded when the fixture was last made (its context raised from
    // 256 to 1,024 positions, which changes its source's hash); the fused export computes the
    // same.
    const RECORDED: &str = "d68ef3cab0543c9c99c71bb62e4d2b720024ef032d377841e5a4a5927050ff97";
    for dir in [tiny_llama(), tiny_llama_fused()] {
        let manifest = inferaligner_runtime::Manifest::load(&dir).expect("manifest");
        assert_eq!(
            manifest.model_sha256().expect("hashes").as_deref(),
            Some(RECORDED),
            "{}",
            dir.display()
        );
    }
}
