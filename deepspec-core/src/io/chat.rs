//! Chat templates (the model's own Jinja template, rendered with minijinja the way
//! transformers renders it) and the assistant loss mask of the reference's data parser.

use super::tokenizer::Tok;
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// ChatML with SmolLM2's default system prompt: used when a model ships no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// DeepSeek-V4's chat format, non-thinking ("chat") mode. V4 ships a Python encoder
/// (`encoding/encoding_dsv4.py`) instead of a Jinja template; this renders the same text for
/// system, user and assistant messages (the encoder as vendored by vLLM,
/// `vllm/tokenizers/deepseek_v4_encoding.py`): BOS, a system message's content with no tag,
/// `<｜User｜>` + content, then `<｜Assistant｜></think>` when an assistant reply follows (or a
/// generation prompt is asked for), and the reply's content + `<｜end▁of▁sentence｜>`. No
/// newlines anywhere. Unlike the encoder, a trailing user message gets the assistant header
/// only with `add_generation_prompt`, as transformers templates do. Tool calls, reasoning
/// and the `developer`/`latest_reminder` roles are not rendered.
pub const DEEPSEEK_V4_TEMPLATE: &str = "{{ '<｜begin▁of▁sentence｜>' }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{% if (loop.last and add_generation_prompt) or (not loop.last and messages[loop.index0 + 1]['role'] == 'assistant') %}{{ '<｜Assistant｜></think>' }}{% endif %}{% elif message['role'] == 'assistant' %}{{ message['content'] + '<｜end▁of▁sentence｜>' }}{% else %}{{ raise_exception('the deepseek-v4 chat format renders system, user and assistant messages, not `' + message['role'] + '`') }}{% endif %}{% endfor %}";

/// Gemma4's chat format, for a Gemma4 model that ships no template: BOS, then every message as
/// `<|turn>{role}\n{content}<turn|>\n` with the assistant's role written `model`, and
/// `<|turn>model\n` as the generation prompt. The empty thought channel that opens a
/// non-thinking reply is part of the assistant content ([`TurnFormat::GEMMA4`] adds it and
/// keeps it out of the loss).
pub const GEMMA4_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<|turn>' + role + '\n' + message['content'] + '<turn|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}";

/// How one family marks assistant turns, for the loss mask (the reference's descriptors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnFormat {
    pub name: &'static str,
    pub assistant_header: &'static str,
    pub end_of_turn: &'static str,
    /// Prepended to every assistant message and excluded from the loss (Gemma4).
    pub assistant_loss_prefix: Option<&'static str>,
    /// Inserted as the system message when a conversation has none.
    pub default_system: Option<&'static str>,
    /// The format's own template, for models that ship none (DeepSeek-V4).
    pub template: Option<&'static str>,
}

impl TurnFormat {
    /// Qwen (ChatML with the reference's default system prompt).
    pub const QWEN: TurnFormat = TurnFormat {
        name: "qwen",
        assistant_header: "<|im_start|>assistant\n",
        end_of_turn: "<|im_end|>\n",
        assistant_loss_prefix: None,
        default_system: Some("You are a helpful assistant."),
        template: None,
    };
    /// ChatML whose template supplies its own default system prompt (SmolLM2).
    pub const CHATML: TurnFormat = TurnFormat {
        name: "chatml",
        assistant_header: "<|im_start|>assistant\n",
        end_of_turn: "<|im_end|>\n",
        assistant_loss_prefix: None,
        default_system: None,
        template: None,
    };
    pub const GEMMA4: TurnFormat = TurnFormat {
        name: "gemma4",
        assistant_header: "<|turn>model\n",
        end_of_turn: "<turn|>\n",
        assistant_loss_prefix: Some("<|channel>thought\n<channel|>"),
        default_system: None,
        template: Some(GEMMA4_TEMPLATE),
    };
    /// Gemma 2/3 turns.
    pub const GEMMA: TurnFormat = TurnFormat {
        name: "gemma",
        assistant_header: "<start_of_turn>model\n",
        end_of_turn: "<end_of_turn>\n",
        assistant_loss_prefix: None,
        default_system: None,
        template: None,
    };

    /// DeepSeek-V4, non-thinking: the header includes the `</think>` that opens a reply
    /// without reasoning, so it is not trained; the reply and its `<｜end▁of▁sentence｜>` are.
    pub const DEEPSEEK_V4: TurnFormat = TurnFormat {
        name: "deepseek-v4",
        assistant_header: "<｜Assistant｜></think>",
        end_of_turn: "<｜end▁of▁sentence｜>",
        assistant_loss_prefix: None,
        default_system: None,
        template: Some(DEEPSEEK_V4_TEMPLATE),
    };

    pub const ALL: [TurnFormat; 5] = [
        Self::QWEN,
        Self::CHATML,
        Self::GEMMA4,
        Self::GEMMA,
        Self::DEEPSEEK_V4,
    ];

    /// The format called `name`; `_` may stand for `-` (`deepseek_v4`).
    pub fn by_name(name: &str) -> Option<TurnFormat> {
        let name = name.replace('_', "-");
        Self::ALL.into_iter().find(|f| f.name == name)
    }

    /// The format names, for error messages: `qwen, chatml, ...`.
    pub fn names() -> String {
        Self::ALL.map(|f| f.name).join(", ")
    }

    /// Guesses the format from a template's text.
    pub fn detect(template: &str) -> Option<TurnFormat> {
        if template == DEEPSEEK_V4_TEMPLATE {
            Some(Self::DEEPSEEK_V4)
        } else if template.contains("<|im_start|>") {
            // Qwen templates carry the thinking block; SmolLM-style ChatML does not.
            Some(if template.contains("<think>") {
                Self::QWEN
            } else {
                Self::CHATML
            })
        } else if template.contains("<|turn>") {
            Some(Self::GEMMA4)
        } else if template.contains("<start_of_turn>") {
            Some(Self::GEMMA)
        } else {
            None
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    pub format: Option<TurnFormat>,
}

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, Error> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
            format: TurnFormat::detect(source),
        })
    }

    /// The tokenizer's own template; when the model ships none, DeepSeek-V4's for a tokenizer
    /// with DeepSeek's `<｜Assistant｜>` token (V4 ships a Python encoder instead), Gemma4's
    /// for one with `<|turn>`, else ChatML.
    pub fn for_tokenizer(tok: &Tok) -> Result<Self, Error> {
        let builtin = if tok.token_id("<｜Assistant｜>").is_some() {
            DEEPSEEK_V4_TEMPLATE
        } else if tok.token_id("<|turn>").is_some() {
            GEMMA4_TEMPLATE
        } else {
            CHATML_TEMPLATE
        };
        let source = tok.chat_template.as_deref().unwrap_or(builtin);
        Self::new(source, tok.bos_token.as_deref(), tok.eos_token.as_deref())
    }

    /// The tokenizer's own template, or `format`'s when the model ships none (a recipe's
    /// `data.chat_template = "deepseek-v4"`); the loss mask follows `format`.
    pub fn for_format(tok: &Tok, format: &TurnFormat) -> Result<Self, Error> {
        let mut template = match (&tok.chat_template, format.template) {
            (None, Some(source)) => {
                Self::new(source, tok.bos_token.as_deref(), tok.eos_token.as_deref())?
            }
            _ => Self::for_tokenizer(tok)?,
        };
        template.format = Some(*format);
        Ok(template)
    }

    /// Renders `messages`. `enable_thinking: Some(false)` is Qwen3's no-thinking mode; `None`
    /// leaves the variable undefined, as the reference's training data path does.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String, Error> {
        let template = self.env.get_template("chat")?;
        match enable_thinking {
            Some(thinking) => template.render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                enable_thinking => thinking,
            }),
            None => template.render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            }),
        }
    }
}

impl ChatTemplate {
    /// The token ids of a generation prompt: `messages` rendered with the assistant's header
    /// appended, then tokenized. Every place that prompts the target (answer regeneration,
    /// evaluation, `deepspec generate`, size estimates) goes through here, so they all see
    /// the same ids for the same conversation.
    pub fn prompt_ids(
        &self,
        tok: &Tok,
        messages: &[Message],
        enable_thinking: Option<bool>,
    ) -> anyhow::Result<Vec<u32>> {
        let text = self.render(messages, true, enable_thinking).map_err(|e| {
            anyhow::anyhow!("rendering a generation prompt with the chat template: {e:#}")
        })?;
        Ok(tok.encode(&text)?)
    }
}

/// Byte ranges of the trained text: each assistant turn's content through its end-of-turn
/// string (or the end of the text), after any loss prefix.
pub fn assistant_spans(text: &str, format: &TurnFormat) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find(format.assistant_header) {
        let mut start = from + found + format.assistant_header.len();
        let end = match text[start..].find(format.end_of_turn) {
            Some(e) => start + e + format.end_of_turn.len(),
            None => text.len(),
        };
        if let Some(prefix) = format.assistant_loss_prefix {
            if text[start..end].starts_with(prefix) {
                start += prefix.len();
            }
        }
        spans.push((start, end));
        from = end;
    }
    spans
}

/// A tokenized training conversation: ids and the 0/1 loss mask over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedChat {
    pub text: String,
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
}

/// Renders and tokenizes a conversation the way the reference's parser does: system prompt
/// rule, template without generation prompt, truncation to `max_length`, and the loss mask
/// from the assistant spans mapped to tokens by tokenizing each span's prefix.
pub fn tokenize_conversation(
    tok: &Tok,
    template: &ChatTemplate,
    format: &TurnFormat,
    messages: &[Message],
    max_length: usize,
) -> anyhow::Result<TokenizedChat> {
    let mut conversation: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    let rest = match messages.first() {
        Some(first) if first.role == "system" => {
            conversation.push(first.clone());
            &messages[1..]
        }
        _ => {
            if let Some(system) = format.default_system {
                conversation.push(Message::new("system", system));
            }
            messages
        }
    };
    anyhow::ensure!(
        rest.first().is_some_and(|m| m.role == "user"),
        "a conversation must start with a user message (after an optional system message)"
    );
    for m in rest {
        let mut m = m.clone();
        if let (Some(prefix), "assistant") = (format.assistant_loss_prefix, m.role.as_str()) {
            if !m.content.starts_with(prefix) {
                m.content = format!("{prefix}{}", m.content);
            }
        }
        conversation.push(m);
    }
    let text = template.render(&conversation, false, None)?;
    let mut input_ids = tok.encode(&text)?;
    input_ids.truncate(max_length);
    let mut loss_mask = vec![0u8; input_ids.len()];
    for (start, end) in assistant_spans(&text, format) {
        let start_tok = tok.encode(&text[..start])?.len().min(input_ids.len());
        let end_tok = tok.encode(&text[..end])?.len().min(input_ids.len());
        if start_tok < end_tok {
            loss_mask[start_tok..end_tok].fill(1);
        }
    }
    Ok(TokenizedChat {
        text,
        input_ids,
        loss_mask,
    })
}

/// The loss mask of a conversation that arrives already tokenized (a serving engine's dump):
/// the assistant spans of the decoded text (special tokens kept), mapped back to tokens. When
/// the ids are the tokenizer's own encoding of that text, a span starts at the token count of
/// the text before it, exactly as [`tokenize_conversation`] does, so the mask equals
/// `prepare`'s; otherwise (an engine's sampled, non-canonical split) at the first token
/// whose decoded prefix reaches the span's start byte.
pub fn loss_mask_from_ids(
    tok: &Tok,
    ids: &[u32],
    format: &TurnFormat,
) -> Result<Vec<u8>, crate::LoadError> {
    let text = tok.decode(ids, false)?;
    let canonical = tok.encode(&text)? == ids;
    let decoded_len = |k: usize| tok.decode(&ids[..k], false).map(|t| t.len());
    // The first token count whose text reaches byte `at`.
    let token_at = |at: usize| -> Result<usize, crate::LoadError> {
        if canonical {
            return Ok(tok.encode(&text[..at])?.len().min(ids.len()));
        }
        let (mut lo, mut hi) = (0, ids.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if decoded_len(mid)? >= at {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo)
    };
    let mut mask = vec![0u8; ids.len()];
    for (start, end) in assistant_spans(&text, format) {
        let (a, b) = (token_at(start)?, token_at(end)?);
        if a < b {
            mask[a..b].fill(1);
        }
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_content_and_end_of_turn() {
        let text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\nopen";
        let spans = assistant_spans(text, &TurnFormat::CHATML);
        let pieces: Vec<&str> = spans.iter().map(|&(s, e)| &text[s..e]).collect();
        assert_eq!(pieces, vec!["yo<|im_end|>\n", "open"]);
    }

    /// A two-turn Gemma4 conversation, rendered byte for byte from the built-in template (the
    /// fixture tokenizer ships none), with the thought channel prepended to each reply and
    /// kept out of the loss spans.
    #[test]
    fn gemma4_two_turns_render_exactly_and_train_the_replies() {
        let dir = crate::fixtures::golden_gemma4_dir().join("target");
        let tok = Tok::from_hf_dir(&dir).unwrap();
        assert!(tok.chat_template.is_none());
        let template = ChatTemplate::for_format(&tok, &TurnFormat::GEMMA4).unwrap();
        let messages = [
            Message::new("user", "<t5> <t6>"),
            Message::new("assistant", "<t7>"),
            Message::new("user", "<t8>"),
            Message::new("assistant", "<t9> <t10>"),
        ];
        let chat =
            tokenize_conversation(&tok, &template, &TurnFormat::GEMMA4, &messages, 4096).unwrap();
        assert_eq!(
            chat.text,
            "<t2><|turn>user\n<t5> <t6><turn|>\n<|turn>model\n<|channel>thought\n<channel|><t7><turn|>\n<|turn>user\n<t8><turn|>\n<|turn>model\n<|channel>thought\n<channel|><t9> <t10><turn|>\n"
        );
        let spans: Vec<&str> = assistant_spans(&chat.text, &TurnFormat::GEMMA4)
            .into_iter()
            .map(|(a, b)| &chat.text[a..b])
            .collect();
        assert_eq!(spans, vec!["<t7><turn|>\n", "<t9> <t10><turn|>\n"]);
        let prompt = template.render(&messages[..3], true, None).unwrap();
        assert!(
            prompt.ends_with("<|turn>user\n<t8><turn|>\n<|turn>model\n"),
            "{prompt}"
        );
    }

    #[test]
    fn gemma4_span_skips_loss_prefix() {
        let text = "<|turn>model\n<|channel>thought\n<channel|>answer<turn|>\n";
        let spans = assistant_spans(text, &TurnFormat::GEMMA4);
        assert_eq!(&text[spans[0].0..spans[0].1], "answer<turn|>\n");
    }
}
