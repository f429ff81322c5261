//! Parity of the DeepSeek-V4 block pieces with Hugging Face transformers' own DeepSeek-V4
//! code (`tests/golden-v4`, or `DEEPSPEC_GOLDEN_V4_DIR`): mHC and the hyper head, the
//! sliding-window attention, the MoE, one decoder layer with every gradient, and a two-layer
//! stack to the logits. Then the DSpark wiring transformers does not have (context keys from
//! `main_x`, block attention over a window), against a direct composition of those pieces.
//! Every size comes from the fixture's `config.json`.

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::optim::GradientsParams;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use deepspec_core::drafter::{
    named_params, BlockDrafter, BlockInputs, DSparkV4Model, DrafterConfig,
};
use deepspec_core::fixtures::{golden_v4_dir, max_abs_diff};
use deepspec_core::io::safetensors::SafetensorsFile;
use deepspec_core::io::{HostTensor, WeightSource};
use deepspec_core::model::attention::{attention_with_sink, Visibility};
use deepspec_core::model::rope::Rope;
use deepspec_core::model::v4::{
    expand_streams, hc_collapse, hc_head, hc_mix, hc_update, HcSettings, V4Attention, V4Block,
    V4Config, V4Moe, V4Rope,
};
use deepspec_core::model::{tensor_from_host, to_host};
use deepspec_core::LoadError;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

type F = Flex;
type AD = Autodiff<Flex>;

fn config() -> (V4Config, Value) {
    let path = golden_v4_dir().join("config.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    (V4Config::from_json(&path, &json).unwrap(), json)
}

fn open(name: &str) -> SafetensorsFile {
    SafetensorsFile::open(golden_v4_dir().join(name)).unwrap()
}

/// The README's suggested forward check: `max|got − want| ≤ 1e-4 · max(1, max|want|)`.
fn assert_forward(name: &str, got: &[f32], want: &HostTensor) {
    let scale = want.data.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let (d, i) = max_abs_diff(got, &want.data);
    assert!(
        d <= 1e-4 * scale,
        "{name}: |diff| {d:.3e} > {:.1e} at {i} (got {}, want {})",
        1e-4 * scale,
        got[i],
        want.data[i]
    );
}

/// Gradients: `max|got − want| ≤ 1e-4 · max|want|`.
fn assert_grad(name: &str, got: &[f32], want: &HostTensor) {
    let scale = want.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (d, i) = max_abs_diff(got, &want.data);
    assert!(
        d <= 1e-4 * scale.max(1e-12),
        "{name}: |diff| {d:.3e} > {:.1e} at {i} (got {}, want {})",
        1e-4 * scale,
        got[i],
        want.data[i]
    );
}

fn tensor<B: Backend, const D: usize>(file: &SafetensorsFile, name: &str) -> Tensor<B, D> {
    tensor_from_host(file.f32(name).unwrap(), &Default::default())
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    to_host(t).data
}

fn positions(file: &SafetensorsFile) -> Vec<Vec<i64>> {
    let (shape, ids) = file.i64("input.position_ids").unwrap();
    ids.chunks(shape[1]).map(<[i64]>::to_vec).collect()
}

/// The fixtures' mask depends on the token index, not the position id.
fn window<B: Backend>(batch: usize, seq: usize, w: usize) -> Visibility<B> {
    let idx = Tensor::<B, 1, Int>::arange(0..seq as i64, &Default::default())
        .unsqueeze::<2>()
        .expand([batch, seq]);
    Visibility::Window {
        query_positions: idx.clone(),
        key_positions: idx,
        window: w,
    }
}

/// A fixture's weights, stored under transformers' names, handed out under DeepSeek's
/// native names (`native_names.json`); the fused `gate_up_proj` / `down_proj` are split per
/// expert as the README's rule says.
struct NativeView {
    file: SafetensorsFile,
    to_hf: BTreeMap<String, String>,
    intermediate: usize,
}

impl NativeView {
    fn new(name: &str, intermediate: usize) -> Self {
        let names: Value = serde_json::from_str(
            &std::fs::read_to_string(golden_v4_dir().join("native_names.json")).unwrap(),
        )
        .unwrap();
        let to_hf = names
            .as_object()
            .unwrap()
            .iter()
            .filter_map(|(hf, native)| native.as_str().map(|n| (n.to_string(), hf.clone())))
            .collect();
        NativeView {
            file: open(name),
            to_hf,
            intermediate,
        }
    }

    /// `layers.{l}.ffn.experts.{e}.w{k}.weight` -> (layer, expert, k).
    fn expert(name: &str) -> Option<(usize, usize, usize)> {
        let rest = name.strip_prefix("layers.")?;
        let (layer, rest) = rest.split_once(".ffn.experts.")?;
        let (e, rest) = rest.split_once(".w")?;
        let k = rest.strip_suffix(".weight")?;
        Some((layer.parse().ok()?, e.parse().ok()?, k.parse().ok()?))
    }
}

impl WeightSource for NativeView {
    fn origin(&self) -> &Path {
        self.file.path()
    }
    fn contains(&self, name: &str) -> bool {
        self.to_hf.contains_key(name) || Self::expert(name).is_some()
    }
    fn names(&self) -> Vec<String> {
        self.to_hf.keys().cloned().collect()
    }
    fn tensor(&self, name: &str) -> Result<HostTensor, LoadError> {
        if let Some(hf) = self.to_hf.get(name) {
            return self.file.f32(hf);
        }
        let (layer, e, k) = Self::expert(name).ok_or_else(|| LoadError::MissingTensor {
            path: self.file.path().to_path_buf(),
            tensor: name.into(),
            hint: String::new(),
        })?;
        let p = format!("model.layers.{layer}.mlp.experts");
        let i = self.intermediate;
        if k == 2 {
            let down = self.file.f32(&format!("{p}.down_proj"))?; // [E, D, I]
            let (d, i) = (down.shape[1], down.shape[2]);
            let data = down.data[e * d * i..(e + 1) * d * i].to_vec();
            return Ok(HostTensor::new(vec![d, i], data));
        }
        let fused = self.file.f32(&format!("{p}.gate_up_proj"))?; // [E, 2I, D]
        let d = fused.shape[2];
        let row0 = e * 2 * i + if k == 1 { 0 } else { i };
        let data = fused.data[row0 * d..(row0 + i) * d].to_vec();
        Ok(HostTensor::new(vec![i, d], data))
    }
}

#[test]
fn golden_v4_hc_mix_sinkhorn_collapse_update_and_hyper_head() {
    let (c, _) = config();
    let f = open("hc.safetensors");
    let e = open("hc.expected.safetensors");
    let streams = f.f32("input.hidden_streams").unwrap();
    let [b, s, n, d]: [usize; 4] = streams.shape.clone().try_into().unwrap();
    let x: Tensor<F, 3> =
        tensor_from_host::<F, 4>(streams, &Default::default()).reshape([b * s, n, d]);
    let settings = HcSettings::from_config(&c);
    let p = "model.layers.0.attn_hc";
    let mix = hc_mix(
        x.clone(),
        tensor(&f, &format!("{p}.fn")),
        tensor(&f, &format!("{p}.base")),
        tensor(&f, &format!("{p}.scale")),
        settings,
    );
    let want = |name: &str| e.f32(&format!("expected.{name}")).unwrap();
    assert_forward("mixes", &host(mix.mixes.clone()), &want("attn_hc.mixes"));
    assert_forward("pre", &host(mix.pre.clone()), &want("attn_hc.pre"));
    assert_forward("post", &host(mix.post.clone()), &want("attn_hc.post"));
    assert_forward(
        "comb_before_sinkhorn",
        &host(mix.comb_before_sinkhorn.clone()),
        &want("attn_hc.comb_before_sinkhorn"),
    );
    assert_forward("comb", &host(mix.comb.clone()), &want("attn_hc.comb"));
    let u = hc_collapse(x.clone(), mix.pre.clone());
    assert_forward("collapsed", &host(u), &want("attn_hc.collapsed"));
    let sub: Tensor<F, 3> = tensor(&f, "input.sublayer_output");
    let new = hc_update(x, sub.reshape([b * s, d]), &mix);
    assert_forward("new_streams", &host(new), &want("attn_hc.new_streams"));

    let head_in = f.f32("input.hc_head.hidden_streams").unwrap();
    let x: Tensor<F, 3> =
        tensor_from_host::<F, 4>(head_in, &Default::default()).reshape([b * s, n, d]);
    let (out, pre) = hc_head(
        x,
        tensor(&f, "model.hc_head.hc_fn"),
        tensor(&f, "model.hc_head.hc_base"),
        tensor(&f, "model.hc_head.hc_scale"),
        settings,
    );
    assert_forward("hc_head.pre", &host(pre), &want("hc_head.pre"));
    assert_forward("hc_head.output", &host(out), &want("hc_head.output"));
}

#[test]
fn golden_v4_attention_sliding_window_sink_and_grouped_output() {
    let (c, _) = config();
    let view = NativeView::new("attention.safetensors", c.moe_intermediate_size);
    let f = &view.file;
    let e = open("attention.expected.safetensors");
    let want = |name: &str| e.f32(&format!("expected.{name}")).unwrap();
    let attn = V4Attention::<F>::load(&view, "layers.0.attn", &c, &Default::default()).unwrap();
    let x: Tensor<F, 3> = tensor(f, "input.hidden_states");
    let [b, s, _] = x.dims();
    let rope =
        V4Rope::new(c.rope_theta, c.rope_head_dim).tables::<F>(&positions(f), &Default::default());
    assert_forward("rope_cos", &host(rope.cos.clone()), &want("rope_cos"));
    assert_forward("rope_sin", &host(rope.sin.clone()), &want("rope_sin"));

    let visibility = window::<F>(b, s, c.sliding_window);
    let (shape, allowed) = f.i64("input.attention_allowed").unwrap();
    let mask = visibility.dense_mask(b, s, s, &Default::default());
    let ours: Vec<i64> = mask
        .int()
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .unwrap();
    assert_eq!(shape, vec![b, 1, s, s]);
    assert_eq!(ours, allowed, "the window mask differs from transformers'");

    assert_forward(
        "q_residual",
        &host(attn.query_residual(x.clone())),
        &want("q_residual"),
    );
    let q = attn.queries(x.clone(), &rope);
    assert_forward("q", &host(q.clone()), &want("q"));
    let kv = attn.key_values(x.clone(), &rope);
    assert_forward("kv", &host(kv.clone()), &want("kv"));
    let core = attn.attend(q, kv, &visibility);
    assert_forward(
        "attn_core_output",
        &host(core.clone().swap_dims(1, 2)),
        &want("attn_core_output"),
    );
    let derotated = rope.apply(core.clone().swap_dims(1, 2), true);
    assert_forward(
        "attn_output_derotated",
        &host(derotated.clone()),
        &want("attn_output_derotated"),
    );
    let [_, _, h, hd] = derotated.dims();
    let grouped = attn.grouped(derotated.reshape([b, s, h * hd]));
    assert_forward("o_a_output", &host(grouped), &want("o_a_output"));
    let out = attn.forward(x, &rope, &visibility);
    assert_forward("output", &host(out), &want("output"));
}

#[test]
fn golden_v4_moe_routing_with_and_without_the_bias() {
    let (c, _) = config();
    let view = NativeView::new("moe.safetensors", c.moe_intermediate_size);
    let e = open("moe.expected.safetensors");
    let want = |name: &str| e.f32(&format!("expected.{name}")).unwrap();
    let mut moe = V4Moe::<F>::load(&view, "layers.0.ffn", &c, &Default::default()).unwrap();
    let x: Tensor<F, 3> = tensor(&view.file, "input.hidden_states");
    let [b, s, d] = x.dims();
    let x: Tensor<F, 2> = x.reshape([b * s, d]);
    let ids_of = |name: &str| -> Vec<Vec<usize>> {
        let (shape, v) = e.i64(name).unwrap();
        v.chunks(shape[1])
            .map(|r| r.iter().map(|&i| i as usize).collect())
            .collect()
    };

    let routing = moe.route(x.clone());
    assert_forward(
        "router_logits",
        &host(routing.logits.clone()),
        &want("router_logits"),
    );
    assert_forward(
        "router_scores",
        &host(routing.scores.clone()),
        &want("router_scores"),
    );
    let bias: Tensor<F, 1> = moe.gate.bias.val();
    let selection = routing.scores.clone() + bias.unsqueeze::<2>();
    assert_forward(
        "selection_scores",
        &host(selection),
        &want("selection_scores"),
    );
    assert_eq!(routing.ids, ids_of("expected.topk_ids"), "topk_ids");
    assert_forward(
        "topk_weights",
        &host(routing.weights.clone()),
        &want("topk_weights"),
    );
    let routed = moe.routed(x.clone(), &routing);
    assert_forward(
        "routed_output",
        &host(routed.clone().reshape([b, s, d])),
        &want("routed_output"),
    );
    let shared = moe.shared_experts.forward(x.clone(), moe.swiglu_limit);
    assert_forward("shared_output", &host(shared), &want("shared_output"));
    assert_forward("output", &host(moe.forward(x.clone())), &want("output"));

    // The bias moves the choice only: zeroed, the fixture's no-bias selection and weights.
    let e_count = c.n_routed_experts;
    moe.gate.bias = Param::from_tensor(Tensor::zeros([e_count], &Default::default()));
    let plain = moe.route(x.clone());
    assert_eq!(
        plain.ids,
        ids_of("expected.no_bias.topk_ids"),
        "no-bias topk_ids"
    );
    assert_forward(
        "no_bias.topk_weights",
        &host(plain.weights.clone()),
        &want("no_bias.topk_weights"),
    );
    assert_forward(
        "no_bias.output",
        &host(moe.forward(x)),
        &want("no_bias.output"),
    );
    let (_, changed) = e.i64("expected.bias_changed_selection").unwrap();
    for (t, flag) in changed.iter().enumerate() {
        let mut a = routing.ids[t].clone();
        let mut p = plain.ids[t].clone();
        a.sort();
        p.sort();
        assert_eq!(a != p, *flag == 1, "token {t}: bias_changed_selection");
    }
}

#[test]
fn golden_v4_decoder_layer_forward_and_every_gradient() {
    let (c, _) = config();
    let view = NativeView::new("decoder_layer.safetensors", c.moe_intermediate_size);
    let f = &view.file;
    let e = open("decoder_layer.expected.safetensors");
    let block = V4Block::<AD>::load(&view, "layers.0", &c, &Default::default()).unwrap();
    let x: Tensor<AD, 4> = tensor::<AD, 4>(f, "input.hidden_streams").require_grad();
    let [b, s, _, _] = x.dims();
    let rope =
        V4Rope::new(c.rope_theta, c.rope_head_dim).tables::<AD>(&positions(f), &Default::default());
    let visibility = window::<AD>(b, s, c.sliding_window);
    let out = block.forward(x.clone(), |attn, input| {
        attn.forward(input, &rope, &visibility)
    });
    assert_forward(
        "output",
        &host(out.clone()),
        &e.f32("expected.output").unwrap(),
    );
    let loss = (out * tensor::<AD, 4>(f, "input.loss_weight")).sum();
    assert_forward(
        "loss",
        &host(loss.clone()),
        &e.f32("expected.loss").unwrap(),
    );

    let grads = loss.backward();
    let gx = x.grad(&grads).unwrap();
    let params = named_params(&block, true);
    let grads = GradientsParams::from_grads(grads, &block);
    assert_grad(
        "input.hidden_streams",
        &host(gx),
        &e.f32("grad.input.hidden_streams").unwrap(),
    );
    let mut per_expert: BTreeMap<(usize, usize), Vec<f32>> = BTreeMap::new();
    let mut checked = 0;
    for p in params {
        let native = format!("layers.0.{}", p.name);
        let got = match p.shape.len() {
            1 => grads.get::<F, 1>(p.id).map(|g| to_host(g).data),
            _ => grads.get::<F, 2>(p.id).map(|g| to_host(g).data),
        }
        .unwrap_or_default();
        if let Some((_, expert, k)) = NativeView::expert(&native) {
            per_expert.insert((expert, k), got);
            continue;
        }
        let hf = &view.to_hf[&native];
        assert_grad(&native, &got, &e.f32(&format!("grad.{hf}")).unwrap());
        checked += 1;
    }
    // The fused expert gradients: gate_up_proj[e] = [w1; w3], down_proj[e] = w2.
    let experts = c.n_routed_experts;
    let (mut gate_up, mut down) = (Vec::new(), Vec::new());
    for x in 0..experts {
        gate_up.extend(&per_expert[&(x, 1)]);
        gate_up.extend(&per_expert[&(x, 3)]);
        down.extend(&per_expert[&(x, 2)]);
    }
    let p = "grad.model.layers.0.mlp.experts";
    assert_grad(
        "experts.gate_up_proj",
        &gate_up,
        &e.f32(&format!("{p}.gate_up_proj")).unwrap(),
    );
    assert_grad(
        "experts.down_proj",
        &down,
        &e.f32(&format!("{p}.down_proj")).unwrap(),
    );
    // Every non-expert trainable parameter had its gradient checked; the gate bias has none.
    let expected_grads = e
        .tensor_names()
        .filter(|n| n.starts_with("grad.model.") && !n.contains("mlp.experts."))
        .count();
    assert_eq!(checked, expected_grads, "gradients checked");
    assert!(
        !block.ffn.gate.bias.val().is_require_grad(),
        "the gate bias is a buffer"
    );
}

/// One safetensors file as a weight source, names as stored.
struct FileSource(SafetensorsFile);

impl WeightSource for FileSource {
    fn origin(&self) -> &Path {
        self.0.path()
    }
    fn contains(&self, name: &str) -> bool {
        self.0.info(name).is_some()
    }
    fn names(&self) -> Vec<String> {
        self.0.tensor_names().cloned().collect()
    }
    fn tensor(&self, name: &str) -> Result<HostTensor, LoadError> {
        self.0.f32(name)
    }
}

/// The stack's weights under native names (`stack_weights_native.safetensors`), as the
/// engines' checkpoints name them, and its decoder blocks.
fn stack() -> (V4Config, FileSource, Vec<V4Block<F>>) {
    let (c, json) = config();
    let src = FileSource(open("stack_weights_native.safetensors"));
    let layers = json["num_hidden_layers"].as_u64().unwrap() as usize;
    let blocks = (0..layers)
        .map(|i| V4Block::<F>::load(&src, &format!("layers.{i}"), &c, &Default::default()).unwrap())
        .collect();
    (c, src, blocks)
}

#[test]
fn golden_v4_stack_layers_hyper_head_norm_and_logits() {
    let (c, w, blocks) = stack();
    let w = &w.0;
    let f = open("stack.safetensors");
    let e = open("stack.expected.safetensors");
    let want = |name: &str| e.f32(&format!("expected.{name}")).unwrap();
    let (shape, ids) = f.i64("input.input_ids").unwrap();
    let (b, s) = (shape[0], shape[1]);
    let device = Default::default();
    let ids = Tensor::<F, 2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
    let embed: Tensor<F, 2> = tensor(w, "embed.weight");
    let d = c.hidden_size;
    let x0: Tensor<F, 3> = embed.select(0, ids.reshape([b * s])).reshape([b, s, d]);
    let mut x = expand_streams(x0, c.hc_mult);
    assert_forward("embed_streams", &host(x.clone()), &want("embed_streams"));
    let rope = V4Rope::new(c.rope_theta, c.rope_head_dim).tables::<F>(&positions(&f), &device);
    let visibility = window::<F>(b, s, c.sliding_window);
    for (i, block) in blocks.iter().enumerate() {
        x = block.forward(x, |attn, input| attn.forward(input, &rope, &visibility));
        assert_forward(
            &format!("layer_{i}.output"),
            &host(x.clone()),
            &want(&format!("layer_{i}.output")),
        );
    }
    let n = c.hc_mult;
    let (h, _) = hc_head(
        x.reshape([b * s, n, d]),
        tensor(w, "hc_head_fn"),
        tensor(w, "hc_head_base"),
        tensor(w, "hc_head_scale"),
        HcSettings::from_config(&c),
    );
    assert_forward("hc_head_output", &host(h.clone()), &want("hc_head_output"));
    let norm = deepspec_core::model::v4::rms(h, c.rms_norm_eps)
        * tensor::<F, 1>(w, "norm.weight").unsqueeze::<2>();
    assert_forward(
        "last_hidden_state",
        &host(norm.clone()),
        &want("last_hidden_state"),
    );
    let head: Tensor<F, 2> = tensor(w, "head.weight");
    assert_forward(
        "logits",
        &host(norm.matmul(head.transpose())),
        &want("logits"),
    );
}

/// Deterministic pseudo-random values in `[-scale, scale)`.
fn noise(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A DSpark drafter whose stages are the oracle-checked stack layers (`layers.{i}` as
/// `mtp.{i}`, the stack's hyper head and norm on the last stage), with seeded `main_proj`,
/// `main_norm`, Markov and confidence weights.
fn wired_drafter(block_size: usize, rank: usize) -> (DSparkV4Model<F>, DrafterConfig) {
    let (c, mut json) = config();
    let layers = json["num_hidden_layers"].as_u64().unwrap() as usize;
    let taps: Vec<usize> = (0..layers).collect();
    let obj = json.as_object_mut().unwrap();
    // One stage per stack layer, so as many taps, below a (pretend) deeper target's last layer.
    obj.insert("num_hidden_layers".into(), (layers + 2).into());
    obj.insert("dspark_block_size".into(), block_size.into());
    obj.insert("dspark_noise_token_id".into(), (c.vocab_size - 1).into());
    obj.insert("dspark_target_layer_ids".into(), serde_json::json!(taps));
    obj.insert("dspark_markov_rank".into(), rank.into());
    obj.insert("enable_confidence_head".into(), true.into());
    obj.insert("dtype".into(), "float32".into());
    let config = DrafterConfig::from_json(Path::new("<wired>/config.json"), json).unwrap();
    let (stack, d, v) = (stack().1, c.hidden_size, c.vocab_size);
    let last = layers - 1;
    let mut tensors = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, seed: u64, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let data = noise(seed, n, scale)
            .into_iter()
            .map(|x| x + offset)
            .collect();
        tensors.insert(name, HostTensor::new(shape, data));
    };
    put(
        "mtp.0.main_proj.weight".into(),
        vec![d, layers * d],
        1,
        0.1,
        0.0,
    );
    put("mtp.0.main_norm.weight".into(), vec![d], 2, 0.5, 1.0);
    let p = format!("mtp.{last}");
    put(
        format!("{p}.markov_head.markov_w1.weight"),
        vec![v, rank],
        3,
        0.5,
        0.0,
    );
    put(
        format!("{p}.markov_head.markov_w2.weight"),
        vec![v, rank],
        4,
        0.5,
        0.0,
    );
    put(
        format!("{p}.confidence_head.proj.weight"),
        vec![1, d + rank],
        5,
        0.2,
        0.0,
    );
    for name in stack.names() {
        let t = stack.tensor(&name).unwrap();
        let renamed = match name.strip_prefix("layers.") {
            Some(rest) => format!("mtp.{rest}"),
            None if name == "embed.weight" || name == "head.weight" => name,
            None => format!("{p}.{name}"),
        };
        tensors.insert(renamed, t);
    }
    let src = deepspec_core::drafter::dspark_v4::HostSource {
        origin: "<wired>".into(),
        tensors,
    };
    let model = DSparkV4Model::<F>::load(&src, &src, &config, &Default::default()).unwrap();
    (model, config)
}

#[test]
fn golden_v4_dspark_block_forward_equals_the_composed_pieces() {
    let (block_size, rank) = (3, 4);
    let (model, _) = wired_drafter(block_size, rank);
    let (c, _) = config();
    let device = Default::default();
    let (d, n, w) = (c.hidden_size, c.hc_mult, c.sliding_window);
    let taps = model.mtp.len();
    let ctx_len = w + 5;
    // Three blocks: one whose window the context start cuts, one past the window, one dropped.
    let anchors = [3i64, ctx_len as i64 - 1, -1];
    let mask = (c.vocab_size - 1) as i64;
    let ctx_raw: Tensor<F, 3> = Tensor::from_data(
        TensorData::new(noise(7, ctx_len * taps * d, 1.0), [1, ctx_len, taps * d]),
        &device,
    );
    let tokens_of = |m: usize| -> Vec<i64> {
        (0..block_size)
            .map(|j| {
                if j == 0 {
                    (11 + 17 * m as i64) % mask
                } else {
                    mask
                }
            })
            .collect()
    };
    let prev_of = |m: usize| -> Vec<i64> {
        (0..block_size)
            .map(|j| (5 + 7 * m as i64 + 3 * j as i64) % mask)
            .collect()
    };
    let mut positions: Vec<i64> = (0..ctx_len as i64).collect();
    let (mut tokens, mut prev) = (Vec::new(), Vec::new());
    for (m, &a) in anchors.iter().enumerate() {
        positions.extend((0..block_size as i64).map(|j| a.max(0) + j));
        tokens.extend(tokens_of(m));
        prev.extend(prev_of(m));
    }
    let nb = anchors.len();
    let inputs = BlockInputs {
        tokens: Tensor::from_data(TensorData::new(tokens, [1, nb * block_size]), &device),
        positions: &[positions],
        anchors: Tensor::from_data(TensorData::new(anchors.to_vec(), [1, nb]), &device),
        prev_tokens: Tensor::from_data(TensorData::new(prev, [1, nb, block_size]), &device),
        window: None,
    };
    let rope = Rope::new(10000.0, 2); // not read by the V4 drafter
    let features = model.block_features(&rope, ctx_raw.clone(), &inputs);
    let hidden = host(features.hidden.clone());
    let confidence = host(features.confidence.clone().unwrap());
    let markov = host(features.markov.clone().unwrap());
    let logits = host(features.logits(&model.head()));

    // The same blocks, one at a time, from the pieces: keys are the window's context slice
    // of main_x then the block, every key visible.
    let main_x = model.main_x(ctx_raw);
    let v4_rope = V4Rope::new(c.rope_theta, c.rope_head_dim);
    for (m, &a) in anchors.iter().enumerate() {
        if a < 0 {
            continue;
        }
        let a = a as usize;
        let lo = a.saturating_sub(w);
        let ctx = main_x.clone().narrow(1, lo, a - lo);
        let ctx_rope = v4_rope.tables::<F>(&[(lo as i64..a as i64).collect()], &device);
        let q_rope = v4_rope.tables::<F>(&[(a as i64..(a + block_size) as i64).collect()], &device);
        let ids =
            Tensor::<F, 2, Int>::from_data(TensorData::new(tokens_of(m), [1, block_size]), &device);
        let mut x = expand_streams(model.embed.forward(ids), n);
        for stage in &model.mtp {
            x = stage.forward(x, |attn, input| {
                let q = attn.queries(input.clone(), &q_rope);
                let kv = Tensor::cat(
                    vec![
                        attn.key_values(ctx.clone(), &ctx_rope),
                        attn.key_values(input, &q_rope),
                    ],
                    2,
                );
                let scale = (c.head_dim as f64).powf(-0.5);
                let o = attention_with_sink(
                    q,
                    kv.clone(),
                    kv,
                    &Visibility::All,
                    scale,
                    attn.attn_sink.val(),
                );
                attn.output(o, &q_rope)
            });
        }
        let x_hc = model.hyper_head(x.reshape([block_size, n, d]));
        let last = model.mtp.last().unwrap();
        let h = last.norm.as_ref().unwrap().forward(x_hc.clone());
        let markov_head = last.markov_head.as_ref().unwrap();
        let prev_ids = Tensor::<F, 3, Int>::from_data(
            TensorData::new(prev_of(m), [1, 1, block_size]),
            &device,
        );
        let e: Tensor<F, 2> = markov_head.embed_prev(prev_ids).reshape([block_size, rank]);
        let z: Tensor<F, 1> = last
            .confidence_head
            .as_ref()
            .unwrap()
            .forward::<2, 1>(x_hc, Some(e.clone()));
        let want_logits = model.head().logits(h.clone(), Some(e.clone()));
        let at = |v: &[f32], width: usize| {
            v[m * block_size * width..(m + 1) * block_size * width].to_vec()
        };
        let close = |name: &str, got: Vec<f32>, want: Vec<f32>| {
            let (diff, i) = max_abs_diff(&got, &want);
            assert!(diff < 2e-5, "block {m} {name}: |diff| {diff:.2e} at {i}");
        };
        close("hidden", at(&hidden, d), host(h));
        close("markov features", at(&markov, rank), host(e));
        close("confidence", at(&confidence, 1), host(z));
        close("logits", at(&logits, c.vocab_size), host(want_logits));
    }
}
