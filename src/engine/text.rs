//! SDXL prompt encoding, as diffusers' `StableDiffusionXLPipeline.encode_prompt` does it.
//!
//! - `prompt_2` falls back to `prompt`, and `negative_prompt_2` to `negative_prompt`, when absent
//!   or empty (diffusers tests them for truthiness).
//! - Each text goes through its own tokenizer and encoder; the penultimate hidden state of each
//!   encoder (`hidden_states[-2]`) is taken and the two are concatenated on the last axis.
//! - The pooled embedding is `text_embeds` of `text_encoder_2` (for the second prompt).
//! - A refiner has `text_encoder_2` only: diffusers pairs the *first* text of each pair
//!   (`prompt`, `negative_prompt`) with it, and its hidden state alone is the conditioning.
//! - With `force_zeros_for_empty_prompt`, an *absent* negative prompt gives all-zero negative
//!   embeddings and pooled embedding; an empty string is encoded like any other text.
//!
//! The positive and negative texts go through each encoder together, as two rows of one session
//! run, and a dynamic batch's requests all together ([`encode_prompts_many`]). diffusers runs
//! them one at a time; rows do not interact, and on the CPU each row equals its text encoded
//! alone bit for bit (`tests/engine_generate.rs`, `tests/engine_batch.rs`).

use std::time::Duration;

use super::model::{SdxlModel, TextEncoder};
use super::tensor;
use super::tokenizer::ClipTokenizer;
use super::EngineError;

/// The conditioning of one text pair: `hidden` is `[seq, width]`, `pooled` is `[pooled_width]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    pub hidden: Vec<f32>,
    pub pooled: Vec<f32>,
    pub seq: usize,
    pub width: usize,
}

impl Embedding {
    fn zeros_like(other: &Embedding) -> Self {
        Self {
            hidden: vec![0.0; other.hidden.len()],
            pooled: vec![0.0; other.pooled.len()],
            seq: other.seq,
            width: other.width,
        }
    }
}

/// The texts of one request, before fallbacks are applied.
#[derive(Debug, Clone, Copy)]
pub struct PromptTexts<'a> {
    pub prompt: &'a str,
    pub prompt_2: Option<&'a str>,
    pub negative_prompt: Option<&'a str>,
    pub negative_prompt_2: Option<&'a str>,
}

impl<'a> PromptTexts<'a> {
    /// The texts of a generation request.
    pub fn of(request: &'a super::GenerateRequest) -> Self {
        PromptTexts {
            prompt: &request.prompt,
            prompt_2: request.prompt_2.as_deref(),
            negative_prompt: request.negative_prompt.as_deref(),
            negative_prompt_2: request.negative_prompt_2.as_deref(),
        }
    }
}

/// Positive and (with guidance) negative conditioning, plus the time spent.
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub positive: Embedding,
    /// `None` when guidance is off.
    pub negative: Option<Embedding>,
    /// Time inside ONNX Runtime.
    pub session_time: Duration,
}

struct EncodedText {
    hidden: Vec<f32>,
    seq: usize,
    width: usize,
    pooled: Option<Vec<f32>>,
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

/// Encode `texts` with one encoder in one session run (one batch row per text; CLIP tokenizers
/// pad every text to the same length). Returns one result per text, in order.
fn encode_texts(
    encoder: &TextEncoder,
    tokenizer: &ClipTokenizer,
    texts: &[&str],
    session_time: &mut Duration,
) -> Result<Vec<EncodedText>, EngineError> {
    const STAGE: &str = "text encoder";
    let mut ids = Vec::new();
    let mut len = None;
    for text in texts {
        let (text_ids, dropped) = tokenizer.encode_counting(text)?;
        if dropped > 0 {
            tracing::warn!(
                dropped,
                max_length = tokenizer.max_length(),
                "prompt truncated: CLIP reads at most {} tokens",
                tokenizer.max_length()
            );
        }
        if *len.get_or_insert(text_ids.len()) != text_ids.len() {
            // Unpadded token lists of different lengths cannot share a batch.
            let mut out = Vec::with_capacity(texts.len());
            for text in texts {
                out.extend(encode_texts(encoder, tokenizer, &[text], session_time)?);
            }
            return Ok(out);
        }
        ids.extend(text_ids);
    }
    let rows = texts.len();
    let shape = [rows as i64, len.unwrap_or(0) as i64];
    let value = tensor::int_value(encoder.input_ids.elem, &shape, &ids).map_err(|source| {
        EngineError::Inference {
            stage: STAGE,
            source,
        }
    })?;
    let mut wanted = vec![encoder.penultimate.as_str()];
    if let Some(p) = &encoder.pooled {
        wanted.push(p.as_str());
    }
    let result = encoder
        .component
        .run(STAGE, vec![("input_ids", value.into())], &wanted)?;
    *session_time += result.session_time;
    let mut outputs = result.outputs.into_iter();
    let hidden = outputs
        .next()
        .ok_or_else(|| EngineError::UnexpectedOutput {
            stage: STAGE,
            message: "no hidden state".to_owned(),
        })?;
    let (seq, width) = match hidden.shape.as_slice() {
        [r, s, w] if *r as usize == rows && *s > 0 && *w > 0 => (*s as usize, *w as usize),
        other => {
            return Err(EngineError::UnexpectedOutput {
                stage: STAGE,
                message: format!("hidden state of shape {other:?}, expected [{rows}, seq, width]"),
            })
        }
    };
    let pooled = match outputs.next() {
        Some(p) => match p.shape.as_slice() {
            [r, w] if *r as usize == rows && *w > 0 => Some((p.data, *w as usize)),
            other => {
                return Err(EngineError::UnexpectedOutput {
                    stage: STAGE,
                    message: format!("text_embeds of shape {other:?}, expected [{rows}, width]"),
                })
            }
        },
        None => None,
    };
    Ok((0..rows)
        .map(|r| EncodedText {
            hidden: hidden.data[r * seq * width..(r + 1) * seq * width].to_vec(),
            seq,
            width,
            pooled: pooled
                .as_ref()
                .map(|(data, w)| data[r * w..(r + 1) * w].to_vec()),
        })
        .collect())
}

/// The two encoders' hidden states `[seq, a_width]` and `[seq, b_width]` side by side:
/// `[seq, a_width + b_width]`.
pub(super) fn concat_hidden(a: &[f32], a_width: usize, b: &[f32], b_width: usize) -> Vec<f32> {
    let mut hidden = Vec::with_capacity(a.len() + b.len());
    for (row_a, row_b) in a.chunks_exact(a_width).zip(b.chunks_exact(b_width)) {
        hidden.extend_from_slice(row_a);
        hidden.extend_from_slice(row_b);
    }
    hidden
}

/// Encode each pair's first text with the first encoder and its second text with the second,
/// concatenated; every encoder runs once for all the pairs.
fn encode_pairs(
    model: &SdxlModel,
    pairs: &[(&str, &str)],
    session_time: &mut Duration,
) -> Result<Vec<Embedding>, EngineError> {
    let no_pooled = || EngineError::UnexpectedOutput {
        stage: "text encoder",
        message: "no text_embeds from text_encoder_2".to_owned(),
    };
    let firsts: Vec<&str> = pairs.iter().map(|p| p.0).collect();
    let seconds: Vec<&str> = pairs.iter().map(|p| p.1).collect();
    let Some((encoder, tokenizer)) = model.text_encoder.as_ref().zip(model.tokenizer.as_ref())
    else {
        // A refiner: the first text of each pair goes to its only encoder.
        let encoded = encode_texts(
            &model.text_encoder_2,
            &model.tokenizer_2,
            &firsts,
            session_time,
        )?;
        return encoded
            .into_iter()
            .map(|b| {
                Ok(Embedding {
                    pooled: b.pooled.ok_or_else(no_pooled)?,
                    hidden: b.hidden,
                    seq: b.seq,
                    width: b.width,
                })
            })
            .collect();
    };
    let first = encode_texts(encoder, tokenizer, &firsts, session_time)?;
    let second = encode_texts(
        &model.text_encoder_2,
        &model.tokenizer_2,
        &seconds,
        session_time,
    )?;
    let mut out = Vec::with_capacity(pairs.len());
    for (a, b) in first.into_iter().zip(second) {
        if a.seq != b.seq {
            return Err(EngineError::UnexpectedOutput {
                stage: "text encoder",
                message: format!("sequence lengths {} and {} that differ", a.seq, b.seq),
            });
        }
        let pooled = b.pooled.ok_or_else(no_pooled)?;
        out.push(Embedding {
            hidden: concat_hidden(&a.hidden, a.width, &b.hidden, b.width),
            pooled,
            seq: a.seq,
            width: a.width + b.width,
        });
    }
    Ok(out)
}

/// Encode the prompts of a request; `guidance` says whether negative conditioning is needed.
pub fn encode_prompts(
    model: &SdxlModel,
    texts: &PromptTexts<'_>,
    guidance: bool,
) -> Result<Conditioning, EngineError> {
    let mut all = encode_prompts_many(model, &[(*texts, guidance)])?;
    all.pop().ok_or_else(|| EngineError::UnexpectedOutput {
        stage: "text encoder",
        message: "no conditioning for the prompt".to_owned(),
    })
}

/// Encode the prompts of several requests, each with its own `guidance`, with one run of each
/// encoder for all of them (a dynamic batch). Rows do not interact, so each result equals
/// its request encoded alone; `session_time` is the shared runs' time in every result.
pub fn encode_prompts_many(
    model: &SdxlModel,
    requests: &[(PromptTexts<'_>, bool)],
) -> Result<Vec<Conditioning>, EngineError> {
    let mut session_time = Duration::ZERO;
    let mut pairs = Vec::new();
    // Per request: whether its negative conditioning is zeros rather than an encoded pair.
    let mut zero_negatives = Vec::with_capacity(requests.len());
    for (texts, guidance) in requests {
        let prompt_2 = non_empty(texts.prompt_2).unwrap_or(texts.prompt);
        let zero_negative =
            texts.negative_prompt.is_none() && model.config.force_zeros_for_empty_prompt;
        pairs.push((texts.prompt, prompt_2));
        if *guidance && !zero_negative {
            // Positive and negative texts share each encoder's run.
            let negative = texts.negative_prompt.unwrap_or("");
            let negative_2 = non_empty(texts.negative_prompt_2).unwrap_or(negative);
            pairs.push((negative, negative_2));
        }
        zero_negatives.push(zero_negative);
    }
    let mut encoded = encode_pairs(model, &pairs, &mut session_time)?.into_iter();
    let mut out = Vec::with_capacity(requests.len());
    for ((_, guidance), zero_negative) in requests.iter().zip(zero_negatives) {
        let positive = encoded
            .next()
            .ok_or_else(|| EngineError::UnexpectedOutput {
                stage: "text encoder",
                message: "no conditioning for the prompt".to_owned(),
            })?;
        let negative = match (*guidance, zero_negative) {
            (false, _) => None,
            (true, true) => Some(Embedding::zeros_like(&positive)),
            (true, false) => Some(
                encoded
                    .next()
                    .ok_or_else(|| EngineError::UnexpectedOutput {
                        stage: "text encoder",
                        message: "no conditioning for the negative prompt".to_owned(),
                    })?,
            ),
        };
        out.push(Conditioning {
            positive,
            negative,
            session_time,
        });
    }
    Ok(out)
}
