//! Draft models: DSpark / DFlash (parallel block drafter) and Eagle3 (autoregressive), loaded
//! from and saved to the reference's checkpoint layout (`config.json` + `model.safetensors`,
//! keys without prefix). Module field names mirror the checkpoint keys, so the key of every
//! parameter is its path in the module tree.

pub mod config;
pub mod dspark;
pub mod dspark_gemma4;
pub mod dspark_v4;
pub mod eagle3;
pub mod eagle3_gemma4;
pub mod heads;
pub mod init;
pub mod layout;

pub use config::{Algorithm, DrafterConfig, MarkovKind};
pub use dspark::{BlockDraft, BlockFeatures, BlockInference, BlockInputs, DSparkModel};
pub use dspark_gemma4::DSparkGemma4Model;
pub use dspark_v4::{DSparkV4Keys, DSparkV4Model};
pub use eagle3::{Eagle3Drafter, Eagle3Inference, Eagle3Model};
pub use eagle3_gemma4::Eagle3Gemma4Model;

use crate::io::safetensors::{write_tensors, Dtype, NamedTensor, SafetensorsCheckpoint};
use crate::io::{HostTensor, WeightSource};
use crate::model::attention::SelfAttention;
use crate::model::embedding::Embedding;
use crate::model::linear::Linear;
use crate::model::mlp::Mlp;
use crate::model::{param_from_host, to_host};
use crate::LoadError;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{backend::Backend, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Marks a parameter as frozen (no gradient; excluded from the optimizer).
pub(crate) fn frozen<B: Backend, const D: usize>(
    param: Param<Tensor<B, D>>,
) -> Param<Tensor<B, D>> {
    param.set_require_grad(false)
}

pub(crate) use crate::model::load::{linear as linear_from, rms_norm as norm_from};

/// The frozen copies of the target's embedding and LM head every drafter carries
/// (`embed_tokens.weight`, `lm_head.weight`, both `[V, H]`).
pub(crate) fn frozen_embedding_and_head<B: Backend>(
    src: &dyn WeightSource,
    config: &DrafterConfig,
    device: &B::Device,
) -> Result<(Embedding<B>, Linear<B>), LoadError> {
    let shape = [config.base.vocab_size, config.base.hidden_size];
    let load = |key: &str| -> Result<Param<Tensor<B, 2>>, LoadError> {
        Ok(frozen(param_from_host(
            src.tensor_shaped(key, &shape)?,
            device,
        )))
    };
    Ok((
        Embedding::new(load("embed_tokens.weight")?),
        Linear::new(load("lm_head.weight")?, None),
    ))
}

/// A drafter layer's attention (`<p>.self_attn.*`, with Qwen3's q/k norms) reading
/// `input_width` features.
pub(crate) fn attention_from<B: Backend>(
    src: &dyn WeightSource,
    p: &str,
    config: &DrafterConfig,
    input_width: usize,
    device: &B::Device,
) -> Result<SelfAttention<B>, LoadError> {
    let c = &config.base;
    let (h, d, eps) = (c.hidden_size, c.head_dim, c.rms_norm_eps);
    let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let bias = c.attention_bias;
    let a = format!("{p}.self_attn");
    Ok(SelfAttention {
        q_proj: linear_from(src, &format!("{a}.q_proj"), q, input_width, bias, device)?,
        k_proj: linear_from(src, &format!("{a}.k_proj"), kv, input_width, bias, device)?,
        v_proj: linear_from(src, &format!("{a}.v_proj"), kv, input_width, bias, device)?,
        o_proj: linear_from(src, &format!("{a}.o_proj"), h, q, bias, device)?,
        q_norm: Some(norm_from(
            src,
            &format!("{a}.q_norm.weight"),
            d,
            eps,
            device,
        )?),
        k_norm: Some(norm_from(
            src,
            &format!("{a}.k_norm.weight"),
            d,
            eps,
            device,
        )?),
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_key_value_heads,
        head_dim: d,
    })
}

/// A drafter layer's SwiGLU MLP (`<p>.mlp.*`).
pub(crate) fn mlp_from<B: Backend>(
    src: &dyn WeightSource,
    p: &str,
    config: &DrafterConfig,
    device: &B::Device,
) -> Result<Mlp<B>, LoadError> {
    let (h, i) = (config.base.hidden_size, config.base.intermediate_size);
    Ok(Mlp {
        gate_proj: linear_from(src, &format!("{p}.mlp.gate_proj"), i, h, false, device)?,
        up_proj: linear_from(src, &format!("{p}.mlp.up_proj"), i, h, false, device)?,
        down_proj: linear_from(src, &format!("{p}.mlp.down_proj"), h, i, false, device)?,
    })
}

/// A drafter's output head as the "LM head + loss" seam sees it: draft logits are
/// `hidden · lm_headᵀ` plus, with a Markov head, `f · markov_w2ᵀ` for the bias features `f`.
/// The LM head is the target's, frozen.
#[derive(Debug, Clone)]
pub struct HeadWeights<B: Backend> {
    /// `[V, H]`
    pub lm_head: Tensor<B, 2>,
    /// `[V, r]`
    pub markov_w2: Option<Tensor<B, 2>>,
    /// Gemma4's final logit soft-cap `c`: logits are `c · tanh(lm_head(h) / c)` (the target's
    /// too), and the Markov bias is added after the cap.
    pub softcap: Option<f64>,
}

impl<B: Backend> HeadWeights<B> {
    pub fn vocab_size(&self) -> usize {
        self.lm_head.dims()[0]
    }

    /// `lm_head(hidden)`, soft-capped where the family caps: `[.., H] -> [.., V]`.
    pub fn base_logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        crate::model::gemma4::softcap(times_transposed(hidden, self.lm_head.clone()), self.softcap)
    }

    /// Dense draft logits over the whole vocabulary, `[.., V]`: the (capped) `lm_head(hidden)`
    /// plus the Markov bias `markov_w2 · f` for features `markov [.., r]` when both exist.
    pub fn logits<const D: usize>(
        &self,
        hidden: Tensor<B, D>,
        markov: Option<Tensor<B, D>>,
    ) -> Tensor<B, D> {
        let base = self.base_logits(hidden);
        match (markov, &self.markov_w2) {
            (Some(f), Some(w2)) => base + times_transposed(f, w2.clone()),
            _ => base,
        }
    }
}

/// `x [.., F] · wᵀ` for `w [V, F]`.
fn times_transposed<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let mut out = dims;
    out[D - 1] = w.dims()[0];
    crate::model::small_matmul::matmul_wt(x.reshape([rows, dims[D - 1]]), w).reshape(out)
}

/// What the block-drafter training loss needs from a drafter: its training forward over
/// every block of a micro-batch and the weights of the "LM head + loss" seam. The Qwen-style
/// DSpark/DFlash model and DeepSeek-V4's DSpark drafter both provide it.
pub trait BlockDrafter<B: Backend> {
    fn device(&self) -> B::Device;
    fn hidden_size(&self) -> usize;
    fn head(&self) -> HeadWeights<B>;
    /// Every block slot's LM-head input, Markov features and confidence logit, from context
    /// features `ctx_raw [b, L, n_t·H]`.
    fn block_features(
        &self,
        rope: &crate::model::rope::Rope,
        ctx_raw: Tensor<B, 3>,
        blocks: &BlockInputs<B>,
    ) -> BlockFeatures<B>;
}

impl<B: Backend> BlockDrafter<B> for DSparkModel<B> {
    fn device(&self) -> B::Device {
        DSparkModel::device(self)
    }
    fn hidden_size(&self) -> usize {
        DSparkModel::hidden_size(self)
    }
    fn head(&self) -> HeadWeights<B> {
        DSparkModel::head(self)
    }
    fn block_features(
        &self,
        rope: &crate::model::rope::Rope,
        ctx_raw: Tensor<B, 3>,
        blocks: &BlockInputs<B>,
    ) -> BlockFeatures<B> {
        DSparkModel::block_features(self, rope, ctx_raw, blocks)
    }
}

/// A loaded drafter of any family.
// One value per loaded checkpoint: the size gap between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Drafter<B: Backend> {
    DSpark(DSparkModel<B>),
    Eagle3(Eagle3Model<B>),
    DSparkV4(DSparkV4Model<B>),
    DSparkGemma4(DSparkGemma4Model<B>),
    Eagle3Gemma4(Eagle3Gemma4Model<B>),
}

/// Every float parameter of a module with its checkpoint key (its module path).
pub struct NamedParam<B: Backend> {
    pub name: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
    pub tensor: Tensor<B, 1>,
}

struct Collector<B: Backend> {
    params: Vec<NamedParam<B>>,
    only_trainable: bool,
    /// Field names from the root down to the current module.
    path: Vec<String>,
}

impl<B: Backend> ModuleVisitor<B> for Collector<B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        if self.only_trainable && !tensor.is_require_grad() {
            return;
        }
        let shape = tensor.dims().to_vec();
        let n: usize = shape.iter().product();
        self.params.push(NamedParam {
            name: checkpoint_key(&self.path),
            id: param.id,
            shape,
            tensor: tensor.reshape([n]),
        });
    }
}

/// Joins a module path into a checkpoint key, dropping the enum variant a [`Drafter`] wraps
/// its model in.
fn checkpoint_key(path: &[String]) -> String {
    path.iter()
        .filter(|p| {
            !matches!(
                p.as_str(),
                "DSpark" | "Eagle3" | "DSparkV4" | "DSparkGemma4" | "Eagle3Gemma4"
            )
        })
        .cloned()
        .collect::<Vec<_>>()
        .join(".")
}

/// All float parameters (`trainable_only`: those that require a gradient), with their keys.
pub fn named_params<B: Backend, M: Module<B>>(
    module: &M,
    trainable_only: bool,
) -> Vec<NamedParam<B>> {
    let mut collector = Collector {
        params: Vec::new(),
        only_trainable: trainable_only,
        path: Vec::new(),
    };
    module.visit(&mut collector);
    collector.params
}

/// The checkpoint's tensors on the host, keyed like the reference's `model.safetensors`.
pub fn state_dict<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, HostTensor> {
    named_params(module, false)
        .into_iter()
        .map(|p| {
            let host = to_host(p.tensor);
            (p.name, HostTensor::new(p.shape, host.data))
        })
        .collect()
}

impl<B: Backend> Drafter<B> {
    /// Loads `dir/config.json` + `dir/model.safetensors` (or sharded safetensors).
    pub fn load(dir: &Path, device: &B::Device) -> Result<(Self, DrafterConfig), LoadError> {
        let config = DrafterConfig::from_file(&dir.join("config.json"))?;
        let src = SafetensorsCheckpoint::open_dir(dir)?;
        let drafter = Self::from_source(&src, &config, device)?;
        let expected: usize = named_params(&drafter, false).len();
        let stored = src.names().len();
        if stored != expected {
            let known: Vec<String> = state_dict_names(&drafter);
            let extra: Vec<String> = src
                .names()
                .into_iter()
                .filter(|n| !known.contains(n))
                .collect();
            return Err(LoadError::field(
                dir.join("model.safetensors"),
                extra.first().cloned().unwrap_or_default(),
                format!(
                    "the checkpoint holds {stored} tensors but config.json describes {expected}; unexpected: {extra:?} (does config.json match the weights?)"
                ),
            ));
        }
        Ok((drafter, config))
    }

    /// Loads a drafter [`Drafter::export`] wrote. A DeepSeek-V4 export holds the `mtp.*`
    /// tensors only (as DeepSeek ships them), so the frozen `embed.weight` and `head.weight`
    /// are read from the target folder `target`; other families load as [`Drafter::load`].
    pub fn load_export(
        dir: &Path,
        target: &Path,
        device: &B::Device,
    ) -> Result<(Self, DrafterConfig), LoadError> {
        let config = DrafterConfig::from_file(&dir.join("config.json"))?;
        let Some((v4, keys)) = &config.v4 else {
            return Self::load(dir, device);
        };
        let src = SafetensorsCheckpoint::open_dir(dir)?;
        let layout = dspark_v4::v4_layout(v4, keys, config.target_layer_ids.len(), false);
        if let Some(extra) = src
            .names()
            .into_iter()
            .find(|n| !layout.iter().any(|(k, _)| k == n))
        {
            return Err(LoadError::field(
                dir.join("model.safetensors"),
                &extra,
                "is not part of a DeepSeek-V4 DSpark drafter (SGLang and vLLM load only the `mtp.*` tensors listed in docs/deepseek-v4.md); is config.json the one written with these weights?".to_string(),
            ));
        }
        let frozen_src = dspark_v4::target_embedding_and_head(target)?;
        let model = DSparkV4Model::load(&src, &frozen_src, &config, device)?;
        Ok((Drafter::DSparkV4(model), config))
    }

    /// Builds the drafter `config` describes from `src`'s tensors.
    pub fn from_source(
        src: &dyn WeightSource,
        config: &DrafterConfig,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        if config.v4.is_some() {
            return Ok(Drafter::DSparkV4(DSparkV4Model::load(
                src, src, config, device,
            )?));
        }
        if config.gemma4.is_some() {
            return Ok(match config.algorithm {
                Algorithm::Eagle3 => {
                    Drafter::Eagle3Gemma4(Eagle3Gemma4Model::load(src, config, device)?)
                }
                _ => Drafter::DSparkGemma4(DSparkGemma4Model::load(src, config, device)?),
            });
        }
        Ok(match config.algorithm {
            Algorithm::DSpark | Algorithm::DFlash => {
                Drafter::DSpark(DSparkModel::load(src, config, device)?)
            }
            Algorithm::Eagle3 => Drafter::Eagle3(Eagle3Model::load(src, config, device)?),
        })
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` in the dtype the config names,
    /// with `{"format": "pt"}` metadata, as the reference's `save_pretrained` does. A
    /// DeepSeek-V4 drafter's training checkpoint also holds the frozen `embed.weight` and
    /// `head.weight`, so it reloads alone; [`export_dir`] leaves them out.
    pub fn save(&self, dir: &Path, config: &DrafterConfig) -> Result<(), LoadError> {
        std::fs::create_dir_all(dir).map_err(|e| LoadError::io(dir, e))?;
        let tensors = state_dict(self);
        let named: Vec<NamedTensor> = tensors
            .iter()
            .map(|(name, t)| NamedTensor {
                name,
                shape: &t.shape,
                data: &t.data,
            })
            .collect();
        let dtype = storage_dtype(config);
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_tensors(&dir.join("model.safetensors"), &named, dtype, &metadata)?;
        let text = serde_json::to_string_pretty(&config.json).expect("config serializes");
        Ok(crate::io::atomic::write_atomically(
            &dir.join("config.json"),
            (text + "\n").as_bytes(),
        )?)
    }
}

/// What [`export_dir`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSummary {
    pub tensors: usize,
    pub parameters: u64,
    /// Tensors of the source left out (DeepSeek-V4: the frozen target embedding and head).
    pub left_out: Vec<String>,
}

/// Writes the drafter checkpoint in `src` (a training `step_*` folder) into `out` in the
/// layout its serving engines load, without building the model: a DeepSeek-V4 drafter as
/// DeepSeek ships it (`model.safetensors` with the `mtp.*` tensors only, every one checked
/// against the published layout, and `config.json`: the target's config plus the `dspark_*`
/// keys); other families as they are. Values are copied in the config's dtype, so a bf16 or
/// f32 checkpoint exports bit for bit.
pub fn export_dir(src: &Path, out: &Path) -> Result<ExportSummary, LoadError> {
    let config = DrafterConfig::from_file(&src.join("config.json"))?;
    let weights = SafetensorsCheckpoint::open_dir(src)?;
    let names = weights.names();
    let wanted: Vec<(String, Vec<usize>)> = match &config.v4 {
        Some((v4, keys)) => dspark_v4::v4_layout(v4, keys, config.target_layer_ids.len(), false),
        None => names
            .iter()
            .map(|n| Ok((n.clone(), weights.tensor(n)?.shape)))
            .collect::<Result<_, LoadError>>()?,
    };
    std::fs::create_dir_all(out).map_err(|e| LoadError::io(out, e))?;
    let mut tensors = Vec::with_capacity(wanted.len());
    for (name, shape) in &wanted {
        tensors.push((name.as_str(), weights.tensor_shaped(name, shape)?));
    }
    let named: Vec<NamedTensor> = tensors
        .iter()
        .map(|(name, t)| NamedTensor {
            name,
            shape: &t.shape,
            data: &t.data,
        })
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_tensors(
        &out.join("model.safetensors"),
        &named,
        storage_dtype(&config),
        &metadata,
    )?;
    let text = serde_json::to_string_pretty(&config.json).expect("config serializes");
    crate::io::atomic::write_atomically(&out.join("config.json"), (text + "\n").as_bytes())?;
    Ok(ExportSummary {
        tensors: wanted.len(),
        parameters: wanted
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum(),
        left_out: names
            .into_iter()
            .filter(|n| !wanted.iter().any(|(w, _)| w == n))
            .collect(),
    })
}

/// The dtype a config says its tensors are stored in.
fn storage_dtype(config: &DrafterConfig) -> Dtype {
    match config.dtype.as_str() {
        "float32" => Dtype::F32,
        "float16" => Dtype::F16,
        _ => Dtype::BF16,
    }
}

fn state_dict_names<B: Backend>(drafter: &Drafter<B>) -> Vec<String> {
    named_params(drafter, false)
        .into_iter()
        .map(|p| p.name)
        .collect()
}
