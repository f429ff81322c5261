//! `deepspec cache merge`: the parts a sharded `prepare --shard i/n` wrote, joined into one
//! cache. Part boundaries fall on multiples of the job's `shard_prompts`, where a single run
//! closes its shards too, so the parts' shards are exactly that run's shards: merging checks
//! that the parts belong together, renumbers the shards and writes a manifest without `part`,
//! byte-identical to the single run's.

use super::manifest::{part_range, shard_file_name, PartOf};
use super::writer::hex;
use super::{Manifest, ShardEntry};
use crate::io::atomic::{write_atomically, PendingFile};
use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The prompt list a cache folder keeps (as `prepare` writes it).
const PROMPTS_FILE: &str = "prompts.jsonl";

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub manifest: Manifest,
    pub parts: usize,
    /// Shards hard-linked from the parts (same file system) and copied (otherwise).
    pub linked: usize,
    pub copied: usize,
}

/// A part folder and its manifest (whose `part` is known to be present).
struct Part {
    dir: PathBuf,
    manifest: Manifest,
    part: PartOf,
}

impl Part {
    fn manifest_path(&self) -> PathBuf {
        Manifest::path(&self.dir)
    }
}

/// Checks that `parts` are every part of one job, each once and finished, and writes the
/// merged cache to `out` (a new or empty folder). Shards are hard-linked where the file system
/// allows and copied otherwise, in both cases checked against the part's size and SHA-256;
/// the manifest is written last, atomically.
pub fn merge_parts(parts: &[PathBuf], out: &Path) -> anyhow::Result<MergeReport> {
    if parts.is_empty() {
        bail!("no parts given: pass every part folder of the job (`deepspec cache merge PART... --out CACHE`)");
    }
    check_out_is_new(out)?;
    let mut loaded = Vec::with_capacity(parts.len());
    for dir in parts {
        let manifest = Manifest::load(dir)?;
        let Some(part) = manifest.part else {
            bail!(
                "{}: field `part` is absent: this folder is not a part of a sharded `deepspec prepare` (made with `--shard i/n`); pass only part folders",
                Manifest::path(dir).display()
            );
        };
        loaded.push(Part {
            dir: dir.clone(),
            manifest,
            part,
        });
    }

    // One job: the same identity and the same cut as the first part.
    let first = &loaded[0];
    for other in &loaded[1..] {
        if let Some((field, ours, theirs)) = first.manifest.job_difference(&other.manifest) {
            bail!(
                "{}: field `{field}`: {theirs}, but {} has {ours}: these folders are parts of different jobs; merge only the parts of one `prepare` job (same recipe, prompt list, target, tokenizer and layers)",
                other.manifest_path().display(),
                first.manifest_path().display()
            );
        }
        if other.part.count != first.part.count {
            bail!(
                "{} is {} but {} is {}: parts of a job cut into different numbers of parts overlap; merge the parts of one `--shard i/N` run (the same N)",
                other.dir.display(),
                other.part,
                first.dir.display(),
                first.part
            );
        }
    }
    let job = &first.manifest.job;
    let count = first.part.count;
    let Some(block) = job.shard_prompts.filter(|&b| b > 0) else {
        bail!(
            "{}: field `job.shard_prompts` is absent: a part must record the block size its range was cut at (rebuild the part with this deepspec)",
            first.manifest_path().display()
        );
    };
    for p in &loaded {
        let expected = part_range(job.num_prompts, block, p.part.index, count);
        if (p.part.source_start, p.part.source_end) != expected {
            bail!(
                "{}: field `part`: records {}, but part {}/{count} of {} prompts in blocks of {block} is prompts [{}, {}); the manifest was edited or written by another deepspec (re-run that part)",
                p.manifest_path().display(),
                p.part,
                p.part.index,
                job.num_prompts,
                expected.0,
                expected.1
            );
        }
    }

    // Every part exactly once.
    let mut by_index: Vec<Option<usize>> = vec![None; count as usize];
    for (k, p) in loaded.iter().enumerate() {
        let slot = &mut by_index[p.part.index as usize];
        if let Some(j) = *slot {
            bail!(
                "{} and {} are both {}: their prompts overlap; pass each part once",
                loaded[j].dir.display(),
                p.dir.display(),
                p.part
            );
        }
        *slot = Some(k);
    }
    let missing: Vec<(usize, String)> = by_index
        .iter()
        .enumerate()
        .filter(|(_, k)| k.is_none())
        .map(|(i, _)| {
            let (s, e) = part_range(job.num_prompts, block, i as u64, count);
            (i, format!("part {i}/{count} (prompts [{s}, {e}))"))
        })
        .collect();
    match missing.as_slice() {
        [] => {}
        [(i, part)] => bail!(
            "{part} is missing: run `deepspec prepare ... --shard {i}/{count}` for it and pass its folder too"
        ),
        _ => bail!(
            "{} parts are missing: {}; run `deepspec prepare ... --shard I/{count}` for each and pass their folders too",
            missing.len(),
            missing
                .iter()
                .map(|(_, p)| p.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    let ordered: Vec<&Part> = by_index
        .iter()
        .map(|k| &loaded[k.expect("checked")])
        .collect();

    // Contiguous (by construction of `part_range`, checked anyway), finished, same list.
    let mut next = 0;
    for p in &ordered {
        if p.part.source_start != next {
            bail!(
                "{}: {} does not start where the part before it ends (prompt {next})",
                p.manifest_path().display(),
                p.part
            );
        }
        next = p.part.source_end;
        if !p.manifest.part_finished() {
            bail!(
                "{}: field `shards`: {} is unfinished: its shards answer prompts [{}, {}) of [{}, {}); re-run its `deepspec prepare ... --shard {}/{count}` command to finish it",
                p.manifest_path().display(),
                p.part,
                p.part.source_start,
                p.manifest.prompts_covered(),
                p.part.source_start,
                p.part.source_end,
                p.part.index
            );
        }
        for (k, s) in p.manifest.shards.iter().enumerate() {
            if s.shard_id != k as u64 {
                bail!(
                    "{}: field `shards[{k}].shard_id` is {}, expected {k} (shards of a part are numbered from 0); re-run that part",
                    p.manifest_path().display(),
                    s.shard_id
                );
            }
        }
        let prompts = p.dir.join(PROMPTS_FILE);
        let text = std::fs::read(&prompts).with_context(|| {
            format!(
                "reading {} (every part keeps the job's prompt list)",
                prompts.display()
            )
        })?;
        let sha = hex(&Sha256::digest(&text));
        if Some(&sha) != job.prompts_sha256.as_ref() {
            bail!(
                "{}: its SHA-256 is {sha}, but field `job.prompts_sha256` of {} is {:?}: the part's prompt list was changed; re-run that part",
                prompts.display(),
                first.manifest_path().display(),
                job.prompts_sha256
            );
        }
    }
    if next != job.num_prompts {
        bail!(
            "the parts answer prompts [0, {next}) of {}; the job's `num_prompts` is not covered",
            job.num_prompts
        );
    }

    // Write: shards, the prompt list, then the manifest.
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let _lock = crate::io::lock::lock_folder(out, ".prepare.lock", "`deepspec cache merge`")?;
    let mut manifest = first.manifest.clone();
    manifest.part = None;
    manifest.shards.clear();
    let (mut linked, mut copied) = (0, 0);
    for p in &ordered {
        for (k, s) in p.manifest.shards.iter().enumerate() {
            let id = manifest.shards.len() as u64;
            let file_name = shard_file_name(id);
            let src = p.dir.join(&s.file_name);
            let field = format!("{}: shards[{k}]", p.manifest_path().display());
            if place_shard(&src, &out.join(&file_name), s, &field)? {
                linked += 1;
            } else {
                copied += 1;
            }
            manifest.shards.push(ShardEntry {
                file_name,
                shard_id: id,
                ..s.clone()
            });
        }
    }
    let prompts = std::fs::read(first.dir.join(PROMPTS_FILE))
        .with_context(|| format!("reading {}", first.dir.join(PROMPTS_FILE).display()))?;
    write_atomically(&out.join(PROMPTS_FILE), &prompts)?;
    manifest.recount();
    if !manifest.complete {
        bail!(
            "the merged shards answer {} of {} prompts (a part's shard list has a gap); re-run the parts",
            manifest.prompts_covered(),
            manifest.job.num_prompts
        );
    }
    manifest.store(out)?;
    Ok(MergeReport {
        manifest,
        parts: ordered.len(),
        linked,
        copied,
    })
}

/// `out` must not exist, or be an empty folder.
fn check_out_is_new(out: &Path) -> anyhow::Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!(
            "--out {}: is a file; merge writes a new cache folder (choose another --out)",
            out.display()
        );
    }
    let mut entries =
        std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))?;
    if entries.next().is_some() {
        bail!(
            "--out {}: the folder exists and is not empty; merge writes a new cache (choose another --out, or delete the folder, e.g. after a merge that failed part way)",
            out.display()
        );
    }
    Ok(())
}

/// Puts the shard `src` at `dst` (hard link, else copy) under a temporary name, checks its
/// size and SHA-256 against the part's manifest entry `s`, then renames it into place.
/// Returns whether it was linked.
fn place_shard(src: &Path, dst: &Path, s: &ShardEntry, field: &str) -> anyhow::Result<bool> {
    let (pending, file) = PendingFile::create(dst)?;
    drop(file);
    let tmp = pending.tmp().to_path_buf();
    std::fs::remove_file(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    let linked = std::fs::hard_link(src, &tmp).is_ok();
    let mut reader =
        std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut writer = if linked {
        None
    } else {
        Some(std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?)
    };
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("reading {}", src.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
        if let Some(w) = &mut writer {
            w.write_all(&buf[..n])
                .with_context(|| format!("writing {}", tmp.display()))?;
        }
    }
    let sha = hex(&hasher.finalize());
    if bytes != s.bytes || sha != s.sha256 {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{}: has {bytes} bytes with SHA-256 {sha}, but {field} lists {} bytes with {}: the part is damaged; re-run that part's prepare (after deleting the shard)",
            src.display(),
            s.bytes,
            s.sha256
        );
    }
    let file = match writer {
        Some(w) => w,
        None => std::fs::File::open(&tmp).with_context(|| format!("opening {}", tmp.display()))?,
    };
    pending.commit(file)?;
    Ok(linked)
}
