//! Prompt files: JSONL in the reference's eval shape (`{"turns": [...]}`), OpenAI messages
//! (`{"messages": [{"role", "content"}]}`), ShareGPT (`{"conversations": [{"from", "value"}]}`)
//! or the reference's training shape (`{"conversations": [{"role", "content"}]}`).
//!
//! A malformed line is reported with its file, line number and field; `--on-bad-line` decides
//! whether it stops the run or is skipped (with a warning). Nothing is dropped silently.

use crate::io::chat::Message;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: field `{field}`: {detail}")]
    BadLine {
        path: PathBuf,
        line: usize,
        field: String,
        detail: String,
    },
    #[error("{path}: holds no prompts{detail}")]
    Empty { path: PathBuf, detail: String },
}

/// What to do with a malformed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBadLine {
    /// Stop with an error naming the file, line and field.
    #[default]
    Fail,
    /// Report it on stderr and go on.
    Skip,
}

/// A conversation to answer: system/user messages (and assistant ones, which are dropped
/// and regenerated).
pub type Conversation = Vec<Message>;

fn role_of(raw: &str) -> Option<&'static str> {
    match raw {
        "user" | "human" => Some("user"),
        "assistant" | "gpt" | "chatgpt" | "bing" | "bard" | "model" => Some("assistant"),
        "system" => Some("system"),
        _ => None,
    }
}

/// Parses one JSONL line into a conversation; `Err((field, detail))` names what is wrong.
pub fn parse_line(text: &str) -> Result<Conversation, (String, String)> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| ("(line)".to_string(), format!("not JSON: {e}")))?;
    let bad = |field: &str, detail: &str| (field.to_string(), detail.to_string());
    let mut conversation = Vec::new();
    if let Some(turns) = value.get("turns") {
        let turns = turns
            .as_array()
            .ok_or_else(|| bad("turns", "must be a list of strings"))?;
        for (i, t) in turns.iter().enumerate() {
            let content = t
                .as_str()
                .ok_or_else(|| bad(&format!("turns[{i}]"), "must be a string"))?;
            conversation.push(Message::new("user", content));
        }
    } else {
        let (key, list) = if let Some(list) = value.get("messages") {
            ("messages", list)
        } else if let Some(list) = value.get("conversations") {
            ("conversations", list)
        } else if value.is_array() {
            ("(line)", &value)
        } else {
            return Err(bad(
                "(line)",
                "expected `turns`, `messages` or `conversations` (a list of messages)",
            ));
        };
        let list = list
            .as_array()
            .ok_or_else(|| bad(key, "must be a list of messages"))?;
        for (i, m) in list.iter().enumerate() {
            let field = |name: &str| format!("{key}[{i}].{name}");
            let (role_key, content_key) = if m.get("from").is_some() {
                ("from", "value")
            } else {
                ("role", "content")
            };
            let raw_role = m
                .get(role_key)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(&field(role_key), "is missing or not a string"))?;
            let role = role_of(raw_role).ok_or_else(|| {
                bad(
                    &field(role_key),
                    &format!(
                        "unknown role `{raw_role}` (user, assistant, system; ShareGPT human, gpt)"
                    ),
                )
            })?;
            let content = m
                .get(content_key)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(&field(content_key), "is missing or not a string"))?;
            conversation.push(Message::new(role, content));
        }
    }
    let first_user = conversation.iter().position(|m| m.role == "user");
    match first_user {
        None => return Err(bad("(line)", "has no user message")),
        Some(i) if conversation[..i].iter().any(|m| m.role != "system") => {
            return Err(bad(
                "(line)",
                "the first non-system message must be a user message",
            ))
        }
        _ => {}
    }
    if conversation
        .iter()
        .any(|m| m.role == "user" && m.content.trim().is_empty())
    {
        return Err(bad("(line)", "a user message is empty"));
    }
    Ok(conversation)
}

/// Reads a prompt file. Blank lines are ignored; bad lines fail or are skipped (each skip is
/// reported through `warn`). An empty result is an error.
pub fn read_prompts(
    path: &Path,
    on_bad_line: OnBadLine,
    limit: Option<usize>,
    mut warn: impl FnMut(&str),
) -> Result<Vec<Conversation>, PromptError> {
    let bytes = std::fs::read(path).map_err(|source| PromptError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut prompts = Vec::new();
    let mut skipped = 0;
    // Lines as `str::lines` splits them (`\n`, an optional `\r` before it), decoded one by one
    // so that a line that is not UTF-8 is reported with its number like any other bad line.
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        if limit.is_some_and(|n| prompts.len() >= n) {
            break;
        }
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let parsed = match std::str::from_utf8(raw) {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => parse_line(line),
            Err(e) => Err((
                "(line)".to_string(),
                format!(
                    "is not valid UTF-8 (bad byte at column {}); save the file as UTF-8",
                    e.valid_up_to() + 1
                ),
            )),
        };
        match parsed {
            Ok(c) => prompts.push(c),
            Err((field, detail)) => match on_bad_line {
                OnBadLine::Fail => {
                    return Err(PromptError::BadLine {
                        path: path.to_path_buf(),
                        line: i + 1,
                        field,
                        detail: format!("{detail} (--on-bad-line skip skips such lines)"),
                    })
                }
                OnBadLine::Skip => {
                    skipped += 1;
                    let err = PromptError::BadLine {
                        path: path.to_path_buf(),
                        line: i + 1,
                        field,
                        detail,
                    };
                    warn(&format!("skipping {err}"));
                }
            },
        }
    }
    if prompts.is_empty() {
        return Err(PromptError::Empty {
            path: path.to_path_buf(),
            detail: if skipped > 0 {
                format!(" ({skipped} malformed lines were skipped)")
            } else {
                " (the file is empty)".into()
            },
        });
    }
    Ok(prompts)
}

/// The normalized prompt list a cache keeps (`prompts.jsonl`): one `{"messages": [...]}` per
/// line. Its SHA-256 identifies the job's input.
pub fn to_jsonl(prompts: &[Conversation]) -> String {
    let mut out = String::new();
    for c in prompts {
        out.push_str(&serde_json::json!({ "messages": c }).to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_all_three_shapes() {
        let turns = parse_line(r#"{"turns": ["a", "b"]}"#).unwrap();
        assert_eq!(
            turns,
            vec![Message::new("user", "a"), Message::new("user", "b")]
        );
        let openai = parse_line(
            r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]}"#,
        )
        .unwrap();
        assert_eq!(openai.len(), 3);
        let sharegpt =
            parse_line(r#"{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#)
                .unwrap();
        assert_eq!(sharegpt[1], Message::new("assistant", "a"));
    }

    #[test]
    fn a_line_that_is_not_utf8_is_named_by_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompts.jsonl");
        let mut bytes = b"{\"turns\": [\"caf\xc3\xa9\"]}\r\n{\"turns\": [\"caf".to_vec();
        bytes.extend_from_slice(b"\xe9\"]}\n{\"turns\": [\"ok\"]}\n");
        std::fs::write(&path, &bytes).unwrap();
        let err = read_prompts(&path, OnBadLine::Fail, None, |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "prompts.jsonl:2: field `(line)`: is not valid UTF-8 (bad byte at column 16)"
            ),
            "{err}"
        );
        let mut warnings = Vec::new();
        let prompts = read_prompts(&path, OnBadLine::Skip, None, |w| {
            warnings.push(w.to_string())
        })
        .unwrap();
        assert_eq!(
            prompts,
            vec![
                vec![Message::new("user", "café")],
                vec![Message::new("user", "ok")]
            ]
        );
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("prompts.jsonl:2"), "{}", warnings[0]);
    }

    #[test]
    fn bad_lines_name_the_field() {
        let (field, _) = parse_line(r#"{"turns": ["a", 3]}"#).unwrap_err();
        assert_eq!(field, "turns[1]");
        let (field, detail) =
            parse_line(r#"{"messages": [{"role": "robot", "content": "q"}]}"#).unwrap_err();
        assert_eq!(field, "messages[0].role");
        assert!(detail.contains("robot"));
        assert!(parse_line(r#"{"messages": [{"role": "assistant", "content": "q"}]}"#).is_err());
        assert!(parse_line("{not json").is_err());
    }
}
