//! Canary mathematics against PyTorch (`tests/reference/canary.py`), and per-neuron mean
//! activations of the tiny model against transformers' (`tests/reference/tiny.py`).

use std::collections::BTreeMap;

use antibody_canary::{Activations, canary_means, drift, mean_activations, select, stab_loss};
use antibody_model::{LlamaConfig, Site, TokenBatch, tiny};
use antibody_testkit::max_abs_diff;
use antibody_testkit::{TestAutodiff, TestBackend};
use burn::tensor::{Tensor, TensorData};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = antibody_testkit::fixtures().join(name);
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("JSON")
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(xs) => xs.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("float") as f32],
        _ => panic!("not floats: {v}"),
    }
}

#[test]
fn drift_quantile_selection_and_stab_loss_match_pytorch() {
    let f = fixture("canary.json");
    let sites: Vec<(Site, &Value)> = f["sites"]
        .as_object()
        .expect("sites")
        .iter()
        .map(|(k, v)| (k.parse::<Site>().expect("site"), v))
        .collect();
    let acts = |key: &str| Activations {
        means: sites.iter().map(|(s, v)| (*s, floats(&v[key]))).collect(),
        tokens: 1,
    };
    let (pre, post) = (acts("pre"), acts("post"));
    let d = drift(&pre, &post);
    for (s, v) in &sites {
        assert!(
            max_abs_diff(&d[s], &floats(&v["drift"])) < 1e-6,
            "{s} drift"
        );
    }
    let q = f["q"].as_f64().expect("q");
    let set = select(&d, q);
    let threshold = f["threshold"].as_f64().expect("threshold");
    assert!(
        (set.threshold - threshold).abs() < 1e-6,
        "{} vs {threshold}",
        set.threshold
    );
    for (s, v) in &sites {
        let expected: Vec<usize> = v["canaries"]
            .as_array()
            .expect("canaries")
            .iter()
            .map(|x| x.as_u64().expect("index") as usize)
            .collect();
        assert_eq!(set.neurons[s], expected, "{s}");
    }

    // L_stab from the activations of a forward, with gradients.
    let device = Default::default();
    let mask =
        Tensor::<TestAutodiff, 2>::from_data(TensorData::new(floats(&f["mask"]), [2, 5]), &device);
    let mut leaves = BTreeMap::new();
    for (s, v) in &sites {
        let w = d[s].len();
        let t = Tensor::<TestAutodiff, 3>::from_data(
            TensorData::new(floats(&v["current"]), [2, 5, w]),
            &device,
        )
        .require_grad();
        leaves.insert(*s, t);
    }
    let current = canary_means(&leaves, mask, &set).expect("means");
    let got: Vec<f32> = current.clone().into_data().to_vec().expect("f32");
    assert!(max_abs_diff(&got, &floats(&f["current_means"])) < 1e-5);
    let target = set.values(&post);
    let loss = stab_loss(current, &target);
    let value: Vec<f32> = loss.clone().into_data().to_vec().expect("f32");
    let expected = f["stab_loss"].as_f64().expect("loss") as f32;
    assert!(
        (value[0] - expected).abs() < 1e-5 * expected.abs().max(1.0),
        "{} vs {expected}",
        value[0]
    );
    let grads = loss.backward();
    for (s, v) in &sites {
        let g: Vec<f32> = leaves[s]
            .grad(&grads)
            .expect("grad")
            .into_data()
            .to_vec()
            .expect("f32");
        assert!(max_abs_diff(&g, &floats(&v["grad"])) < 1e-6, "{s} gradient");
    }
}

#[test]
fn tiny_model_means_match_transformers() {
    // Row 1 of the tiny batch (unpadded); transformers' layer-1 activations are in the
    // fixture, so their per-neuron means over the 10 tokens are the reference.
    let f = fixture("tiny.json");
    let row = f["batch"]["layer1_sites_row"].as_u64().expect("row") as usize;
    let ids: Vec<u32> = f["batch"]["input_ids"][row]
        .as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect();
    let model =
        tiny::random_model::<TestBackend>(&LlamaConfig::tiny_test(), 0, &Default::default())
            .expect("model");
    // The same row twice, once with left padding: means over real tokens must not change.
    let mut padded = vec![2u32; 3];
    padded.extend(&ids);
    let batches = [
        TokenBatch::left_padded(std::slice::from_ref(&ids), 2),
        TokenBatch {
            ids: padded,
            mask: [vec![false; 3], vec![true; ids.len()]].concat(),
            batch: 1,
            seq: ids.len() + 3,
        },
    ];
    let sites = [Site::attn_out(1), Site::mlp_hidden(1)];
    let acts = mean_activations(&model, &batches, &sites).expect("means");
    assert_eq!(acts.tokens, 2 * ids.len());
    for (site, key, w) in [
        (sites[0], "attn_out_1", 64),
        (sites[1], "mlp_hidden_1", 128),
    ] {
        let values = floats(&f["batch"]["layer1_sites"][key]);
        let n = values.len() / w;
        let expected: Vec<f32> = (0..w)
            .map(|j| (0..n).map(|t| f64::from(values[t * w + j])).sum::<f64>() as f32 / n as f32)
            .collect();
        let diff = max_abs_diff(&acts.means[&site], &expected);
        assert!(
            diff < 1e-5,
            "{site}: means differ from transformers' by {diff}"
        );
    }
}

#[test]
fn the_report_is_written_as_json_and_parquet() {
    let site = Site::mlp_hidden(2);
    let pre = Activations {
        means: BTreeMap::from([(site, vec![0.0, 1.0, 2.0, 3.0])]),
        tokens: 10,
    };
    let post = Activations {
        means: BTreeMap::from([(site, vec![0.0, 1.5, 2.0, 9.0])]),
        tokens: 10,
    };
    let d = drift(&pre, &post);
    let set = select(&d, 0.5);
    let summary = antibody_canary::report::summarize(Some(3), &pre, &post, &d, &set, 4);
    assert_eq!(summary.count, 2);
    assert_eq!(summary.by_site.get("mlp.2"), Some(&2));
    assert_eq!(summary.histogram.counts.iter().sum::<usize>(), 4);
    let frame = antibody_canary::report::table(&pre, &post, &d, &set).expect("table");
    let dir = tempfile::tempdir().expect("tempdir");
    let (json, parquet) =
        antibody_canary::report::write(dir.path(), "cycle-3", &summary, frame).expect("write");
    let back: antibody_canary::report::CanaryReport =
        serde_json::from_str(&std::fs::read_to_string(json).expect("json")).expect("parse");
    assert_eq!(back, summary);
    let file = std::fs::File::open(parquet).expect("parquet");
    use polars::prelude::{ParquetReader, SerReader};
    let df = ParquetReader::new(file).finish().expect("read parquet");
    assert_eq!(df.height(), 4);
    let canary: Vec<Option<bool>> = df
        .column("canary")
        .expect("column")
        .bool()
        .expect("bool")
        .iter()
        .collect();
    assert_eq!(
        canary,
        vec![Some(false), Some(true), Some(false), Some(true)]
    );
}
