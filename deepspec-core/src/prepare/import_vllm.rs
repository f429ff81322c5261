//! `deepspec cache import-vllm`: a training cache from vLLM's hidden-state dumps.
//!
//! vLLM's `ExampleHiddenStatesConnector` (with the `extract_hidden_states` speculative
//! method) writes one safetensors file per request: `token_ids` `[T]` (int64, the prompt's
//! tokens: send prompt + answer with `max_tokens=1`) and `hidden_states` `[T, n, H]` (the
//! model dtype, bf16). Slot `j` holds the layer ids asked for with
//! `eagle_aux_hidden_state_layer_ids`, **in ascending order** (vLLM stacks them as the forward
//! pass meets them), where id `k` is the residual stream after `k` decoder layers: deepspec's
//! tap `i` ("output of layer i") is vLLM's id `i + 1`, and id `L` (all layers) is the last
//! layer's output **before** the final norm, which this import applies with the target's own
//! norm weight. No layer ids are stored in the file, so they come from the launch command
//! (`--dump-layer-ids`) or default to the recipe's taps plus one, and `L`.
//!
//! The loss mask is computed from the token ids with the recipe's chat format
//! ([`loss_mask_from_ids`]); samples are truncated to `data.max_length` and those with fewer
//! than `data.min_loss_tokens` trained tokens are dropped, as `prepare` does. Shards close
//! at `prepare.shard_max_bytes` exactly as `prepare` closes them, the manifest records the
//! engine, the layer mapping and every file's SHA-256, and an interrupted import resumes
//! after its last whole shard with the same bytes.

use super::plan::{self, PrepareOptions, PromptSource};
use super::{kept_prefix, remove_temporaries, Dropped, OpenShard, Progress};
use crate::cache::writer::sha256_file;
use crate::cache::{CacheSample, EncodedHidden, ImportSource, ImportedFile, Manifest};
use crate::io::chat::loss_mask_from_ids;
use crate::io::gguf::{GgufFile, GgufWeights};
use crate::io::safetensors::{Dtype, SafetensorsCheckpoint, SafetensorsFile};
use crate::io::WeightSource;
use crate::model::config::Family;
use crate::prepare::DropReason;
use crate::recipe::Recipe;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// The dump's tensors, by vLLM's names.
pub const TOKEN_IDS: &str = "token_ids";
pub const HIDDEN_STATES: &str = "hidden_states";

/// What the dump's last slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastSlot {
    /// The last layer's output before the final norm (vLLM's id `L`): normalised here.
    PreNorm,
    /// Already the final norm's output (a capture that hands over the LM head's input).
    PostNorm,
}

impl LastSlot {
    pub fn name(self) -> &'static str {
        match self {
            LastSlot::PreNorm => "pre-norm",
            LastSlot::PostNorm => "post-norm",
        }
    }
}

#[derive(Debug, Clone)]
pub struct VllmImportOptions {
    pub recipe: Recipe,
    pub recipe_path: PathBuf,
    /// The folder of `*.safetensors` dumps (vLLM's `shared_storage_path`).
    pub dumps: PathBuf,
    pub out: PathBuf,
    /// The ids given to vLLM as `eagle_aux_hidden_state_layer_ids` (vLLM numbering, any
    /// order); `None`: the recipe's taps plus one, and the layer count.
    pub dump_layer_ids: Option<Vec<usize>>,
    pub last_slot: LastSlot,
}

#[derive(Debug)]
pub struct VllmImportReport {
    pub manifest: Manifest,
    pub files: usize,
    /// Files imported by this run (a resumed run skips those its finished shards cover).
    pub imported: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub dropped: Dropped,
}

/// Where each cached quantity sits in the dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// Ascending, as the file's slots are.
    pub dump_layer_ids: Vec<usize>,
    pub tap_slots: Vec<usize>,
    pub last_slot: usize,
}

/// Maps the recipe's taps (deepspec numbering) and the final state onto the dump's slots.
pub fn slot_map(
    taps: &[usize],
    num_layers: usize,
    dump_layer_ids: Option<&[usize]>,
) -> Result<SlotMap, String> {
    let mut ids: Vec<usize> = match dump_layer_ids {
        Some(ids) => ids.to_vec(),
        None => taps.iter().map(|t| t + 1).chain([num_layers]).collect(),
    };
    ids.sort_unstable();
    ids.dedup();
    if let Some(bad) = ids.iter().find(|&&k| k > num_layers) {
        return Err(format!(
            "dump layer id {bad} does not exist: vLLM ids run from 0 (the embeddings) to {num_layers} (after the last of the target's {num_layers} layers)"
        ));
    }
    let slot = |k: usize| ids.iter().position(|&d| d == k);
    let tap_slots = taps
        .iter()
        .map(|&t| {
            slot(t + 1).ok_or_else(|| {
                format!(
                    "the recipe taps layer {t} (vLLM id {}), which the dump layer ids {ids:?} do not hold; capture it or change model.target_layer_ids",
                    t + 1
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let last_slot = slot(num_layers).ok_or_else(|| {
        format!(
            "the dump layer ids {ids:?} do not hold id {num_layers} (the last layer's output), which the cache's final hidden state comes from; add it to eagle_aux_hidden_state_layer_ids"
        )
    })?;
    Ok(SlotMap {
        dump_layer_ids: ids,
        tap_slots,
        last_slot,
    })
}

/// The `*.safetensors` files of `dir`, by name (vLLM's `.lock` sidecars and anything else
/// are skipped).
fn dump_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "safetensors") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no *.safetensors dumps (vLLM writes them to the connector's shared_storage_path; see docs/engine-caches.md)",
            dir.display()
        );
    }
    Ok(files)
}

/// The target's final norm weight, from its folder or GGUF file: `model.norm.weight`, or
/// Gemma4's `model.language_model.norm.weight`.
fn final_norm(target: &Path, family: Family, hidden: usize) -> anyhow::Result<Vec<f32>> {
    let is_gguf = target
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let name = match family {
        Family::Gemma4 => "model.language_model.norm.weight",
        _ => "model.norm.weight",
    };
    let weight = if is_gguf {
        let file = GgufFile::open(target)?;
        GgufWeights::new(file, 1, 1).tensor_shaped(name, &[hidden])?
    } else {
        SafetensorsCheckpoint::open_dir(target)?.tensor_shaped(name, &[hidden])?
    };
    Ok(weight.data)
}

/// `x · rsqrt(mean x² + eps) · w` per row, as the target's `RmsNorm`.
fn rms_rows(rows: &mut [f32], weight: &[f32], eps: f64) {
    for row in rows.chunks_exact_mut(weight.len()) {
        let mean = row.iter().map(|&v| v * v).sum::<f32>() / row.len() as f32;
        let inv = (mean + eps as f32).sqrt().recip();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
}

/// `manifest` with `shards` (to ask [`kept_prefix`] which of an older manifest's shards are
/// whole).
fn old_with(manifest: &Manifest, shards: &[crate::cache::ShardEntry]) -> Manifest {
    let mut m = manifest.clone();
    m.shards = shards.to_vec();
    m
}

/// One dump file as a cache sample, or why it is dropped.
struct Decoded {
    sample: Option<CacheSample>,
    dropped: Option<DropReason>,
    tokens: u64,
}

struct Importer<'a> {
    map: &'a SlotMap,
    hidden: usize,
    vocab: usize,
    max_length: usize,
    min_loss_tokens: usize,
    norm: Option<(Vec<f32>, f64)>,
    tok: &'a crate::io::tokenizer::Tok,
    format: crate::io::chat::TurnFormat,
    dtype: crate::cache::HiddenDtype,
}

impl Importer<'_> {
    fn decode(&self, path: &Path, source: u64) -> anyhow::Result<Decoded> {
        let file = SafetensorsFile::open(path)?;
        let missing = |name: &str| {
            let found: Vec<&String> = file.tensor_names().collect();
            anyhow::anyhow!(
                "{}: no tensor `{name}` (found {found:?}); a vLLM hidden-states dump holds `{TOKEN_IDS}` and `{HIDDEN_STATES}`",
                path.display()
            )
        };
        if file.info(TOKEN_IDS).is_none() {
            return Err(missing(TOKEN_IDS));
        }
        let info = file
            .info(HIDDEN_STATES)
            .ok_or_else(|| missing(HIDDEN_STATES))?;
        let (id_shape, ids) = file.i64(TOKEN_IDS)?;
        let t = ids.len();
        let n = self.map.dump_layer_ids.len();
        let shape = info.shape.clone();
        if id_shape.len() != 1 || t == 0 {
            bail!(
                "{}: tensor `{TOKEN_IDS}` has shape {id_shape:?}, expected [T] with T > 0",
                path.display()
            );
        }
        if shape.len() != 3 || shape[0] != t {
            bail!(
                "{}: tensor `{HIDDEN_STATES}` has shape {shape:?}, expected [T = {t}, layers, hidden]",
                path.display()
            );
        }
        if shape[2] != self.hidden {
            bail!(
                "{}: tensor `{HIDDEN_STATES}` has hidden size {} but the recipe's target has {}: a dump of another model?",
                path.display(),
                shape[2],
                self.hidden
            );
        }
        if shape[1] != n {
            bail!(
                "{}: tensor `{HIDDEN_STATES}` holds {} layers but the dump layer ids {:?} name {n}; pass the ids vLLM was launched with as --dump-layer-ids",
                path.display(),
                shape[1],
                self.map.dump_layer_ids
            );
        }
        if !matches!(info.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
            bail!(
                "{}: tensor `{HIDDEN_STATES}` is {}, expected BF16 (or F16/F32)",
                path.display(),
                info.dtype.name()
            );
        }
        if let Some((i, &bad)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id as u64 >= self.vocab as u64)
        {
            bail!(
                "{}: tensor `{TOKEN_IDS}`: id {bad} at position {i} is outside the target's vocabulary of {}: a dump of another model?",
                path.display(),
                self.vocab
            );
        }
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let mut mask = loss_mask_from_ids(self.tok, &ids, &self.format)
            .with_context(|| format!("{}: the loss mask from `{TOKEN_IDS}`", path.display()))?;
        let keep = t.min(self.max_length);
        let trained: usize = mask[..keep].iter().map(|&m| m as usize).sum();
        if trained < self.min_loss_tokens {
            let reason = if t > self.max_length {
                DropReason::TooLong
            } else {
                DropReason::TooFewLossTokens
            };
            return Ok(Decoded {
                sample: None,
                dropped: Some(reason),
                tokens: t as u64,
            });
        }
        mask.truncate(keep);
        let values = file.f32(HIDDEN_STATES)?.data;
        let h = self.hidden;
        let mut taps = Vec::with_capacity(keep * self.map.tap_slots.len() * h);
        let mut last = Vec::with_capacity(keep * h);
        for pos in 0..keep {
            let row = &values[pos * n * h..(pos + 1) * n * h];
            for &s in &self.map.tap_slots {
                taps.extend_from_slice(&row[s * h..(s + 1) * h]);
            }
            let s = self.map.last_slot;
            last.extend_from_slice(&row[s * h..(s + 1) * h]);
        }
        if let Some(bad) = taps.iter().chain(&last).position(|v| !v.is_finite()) {
            bail!(
                "{}: tensor `{HIDDEN_STATES}` holds a non-finite value (value {bad} of those read)",
                path.display()
            );
        }
        if let Some((weight, eps)) = &self.norm {
            rms_rows(&mut last, weight, *eps);
        }
        Ok(Decoded {
            sample: Some(CacheSample {
                source_index: source,
                input_ids: ids[..keep].to_vec(),
                loss_mask: mask,
                hidden: EncodedHidden::encode(&taps, h, self.dtype),
                last_hidden: EncodedHidden::encode(&last, h, self.dtype),
            }),
            dropped: None,
            tokens: t as u64,
        })
    }
}

/// Imports (or resumes importing) `opts.dumps` into `opts.out`.
pub fn import_vllm(
    opts: &VllmImportOptions,
    progress: &dyn Progress,
) -> anyhow::Result<VllmImportReport> {
    let started = std::time::Instant::now();
    let recipe = &opts.recipe;
    let out = &opts.out;
    // The same identity `prepare` records (target, tokenizer, layers, settings).
    let mut planned = plan::plan_job(&PrepareOptions {
        recipe: recipe.clone(),
        recipe_path: opts.recipe_path.clone(),
        // No prompts are read: the dumps replace them (the count and hash are set below).
        source: PromptSource::SelfInstruct(1),
        limit: None,
        out: out.clone(),
        shard: None,
    })?;
    // Imports close shards by size only (they cannot be sharded by prompt position).
    planned.manifest.job.shard_prompts = None;
    let target = &recipe.model.target_model_name_or_path;
    let (config, tok) = crate::model::load_target_meta(target)?;
    if config.family == Family::DeepseekV4 && opts.last_slot == LastSlot::PreNorm {
        bail!(
            "{}: DeepSeek-V4's captured last slot is a mean over its mHC streams, not the hc_head collapse its final norm reads, so a pre-norm import would not give the LM head's input; capture the post-norm state and pass --last-slot post-norm",
            target.display()
        );
    }
    let map = slot_map(
        &recipe.model.target_layer_ids,
        config.num_hidden_layers,
        opts.dump_layer_ids.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", opts.recipe_path.display()))?;
    let files = dump_files(&opts.dumps)?;
    progress.begin("hashing dumps", files.len() as u64);
    let mut recorded = Vec::with_capacity(files.len());
    for path in &files {
        let bytes = std::fs::metadata(path)
            .with_context(|| path.display().to_string())?
            .len();
        recorded.push(ImportedFile {
            file_name: path
                .file_name()
                .expect("listed files have names")
                .to_string_lossy()
                .into_owned(),
            bytes,
            sha256: sha256_file(path)?,
        });
        progress.advance(1, &super::Throughput::default());
    }
    progress.finish();
    let list = serde_json::to_string(&recorded).expect("file list serializes");
    let job = &mut planned.manifest.job;
    job.source = format!("import-vllm:{}", opts.dumps.display());
    job.prompts_sha256 = Some(plan::sha256_hex(list.as_bytes()));
    job.num_prompts = files.len() as u64;
    // Generation settings do not apply: the engine wrote the answers.
    job.temperature = 0.0;
    job.top_p = 1.0;
    job.top_k = 0;
    job.max_new_tokens = 0;
    job.stop_tokens = Vec::new();
    job.enable_thinking = false;
    job.seed = 0;
    job.batch_size = 1;
    planned.manifest.import = Some(ImportSource {
        engine: "vllm".into(),
        dump_layer_ids: map.dump_layer_ids.clone(),
        tap_slots: map.tap_slots.clone(),
        last_slot: map.last_slot,
        last_hidden: opts.last_slot.name().into(),
        files: recorded,
    });

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let _lock = crate::io::lock::lock_folder(out, ".prepare.lock", "`deepspec cache import-vllm`")?;
    remove_temporaries(out)?;
    let mut manifest = planned.manifest.clone();
    if Manifest::path(out).exists() {
        let old = Manifest::load(out)?;
        // Same target, layers, settings and mapping; the file list may differ past what the
        // finished shards cover (a damaged dump replaced after an import stopped on it).
        let mut expected = planned.manifest.clone();
        expected.job.prompts_sha256 = old.job.prompts_sha256.clone();
        expected.job.num_prompts = old.job.num_prompts;
        if let (Some(e), Some(o)) = (&mut expected.import, &old.import) {
            e.files = o.files.clone();
        }
        old.check_same_job(out, &expected)?;
        let mut shards = old.shards;
        shards.truncate(kept_prefix(out, &old_with(&manifest, &shards)));
        let covered = shards.last().map_or(0, |s| s.source_end) as usize;
        let new_files = &manifest.import.as_ref().expect("set above").files;
        let old_files = &old.import.as_ref().map_or(&[][..], |i| &i.files[..]);
        if covered > new_files.len() || old_files.get(..covered) != new_files.get(..covered) {
            bail!(
                "{}: the cache's finished shards were imported from dumps that are no longer in {} as they were (a file among the first {covered} changed or is gone); import into a new --out folder",
                Manifest::path(out).display(),
                opts.dumps.display()
            );
        }
        manifest.shards = shards;
    }
    manifest.recount();
    manifest.store(out)?;

    let norm = match opts.last_slot {
        LastSlot::PreNorm => Some((
            final_norm(target, config.family, config.hidden_size)?,
            config.rms_norm_eps,
        )),
        LastSlot::PostNorm => None,
    };
    let importer = Importer {
        map: &map,
        hidden: config.hidden_size,
        vocab: config.vocab_size,
        max_length: recipe.data.max_length,
        min_loss_tokens: recipe.data.min_loss_tokens,
        norm,
        tok: &tok,
        format: planned.format,
        dtype: planned.layout.hidden_dtype,
    };
    let layout = planned.layout.clone();
    let per_token = layout
        .hidden_dtype
        .bytes_per_token(layout.hidden_size, layout.target_layer_ids.len())
        as u64;
    let total = files.len() as u64;
    let resume_at = manifest.prompts_covered();
    progress.begin("import-vllm", total - resume_at);
    let mut throughput = super::Throughput::default();
    let mut open: Option<OpenShard> = None;
    let mut dropped = Dropped::default();
    let mut tokens = 0;
    let shard_max = recipe.prepare.shard_max_bytes;
    for source in resume_at..total {
        let path = &files[source as usize];
        let decoded = importer.decode(path, source)?;
        tokens += decoded.tokens;
        throughput.target_tokens += decoded.tokens;
        throughput.target_secs = started.elapsed().as_secs_f64();
        if let Some(reason) = decoded.dropped {
            dropped.count(reason);
        }
        // As `prepare` with batches of one: close the shard before this sample overflows it.
        let bytes = decoded.sample.as_ref().map_or(0, |s| {
            s.seq_len() as u64 * per_token + plan::SAMPLE_OVERHEAD_BYTES
        });
        if open
            .as_ref()
            .is_some_and(|o| o.payload > 0 && o.payload + bytes > shard_max)
        {
            open.take()
                .expect("checked")
                .finish(out, source, &mut manifest)?;
        }
        let shard = match &mut open {
            Some(shard) => shard,
            None => open.insert(OpenShard::create(
                out,
                manifest.shards.len() as u64,
                source,
                &layout,
            )?),
        };
        if let Some(sample) = &decoded.sample {
            shard.writer.push(sample)?;
        }
        shard.payload += bytes;
        progress.advance(1, &throughput);
    }
    if let Some(shard) = open {
        shard.finish(out, total, &mut manifest)?;
    }
    manifest.recount();
    manifest.store(out)?;
    progress.finish();
    Ok(VllmImportReport {
        manifest,
        files: files.len(),
        imported: total - resume_at,
        tokens,
        seconds: started.elapsed().as_secs_f64(),
        dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_slots_are_the_taps_plus_one_and_the_layer_count() {
        let map = slot_map(&[1, 3, 5], 6, None).unwrap();
        assert_eq!(map.dump_layer_ids, vec![2, 4, 6]);
        assert_eq!(map.tap_slots, vec![0, 1, 2]);
        assert_eq!(map.last_slot, 2);
        // Ids as launched, in any order: the file's slots are ascending.
        let map = slot_map(&[1, 3], 6, Some(&[6, 4, 0, 2])).unwrap();
        assert_eq!(map.dump_layer_ids, vec![0, 2, 4, 6]);
        assert_eq!(map.tap_slots, vec![1, 2]);
        assert_eq!(map.last_slot, 3);
    }

    /// The final norm a pre-norm import applies is the target's own, under each family's name.
    #[test]
    fn the_final_norm_is_read_under_each_familys_name() {
        for (dir, family, name) in [
            (
                crate::fixtures::golden_dir().join("target"),
                Family::Qwen3,
                "model.norm.weight",
            ),
            (
                crate::fixtures::golden_gemma4_dir().join("target"),
                Family::Gemma4,
                "model.language_model.norm.weight",
            ),
        ] {
            let file = crate::io::safetensors::SafetensorsFile::open(dir.join("model.safetensors"))
                .unwrap();
            let want = file.f32(name).unwrap();
            assert_eq!(final_norm(&dir, family, want.shape[0]).unwrap(), want.data);
        }
    }

    #[test]
    fn a_tap_or_last_layer_the_dump_lacks_is_named() {
        let err = slot_map(&[1, 3], 6, Some(&[2, 6])).unwrap_err();
        assert!(err.contains("taps layer 3 (vLLM id 4)"), "{err}");
        let err = slot_map(&[1], 6, Some(&[2])).unwrap_err();
        assert!(err.contains("do not hold id 6"), "{err}");
        let err = slot_map(&[1], 6, Some(&[2, 7])).unwrap_err();
        assert!(err.contains("dump layer id 7 does not exist"), "{err}");
    }
}
