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

fn encode_one(
    encoder: &TextEncoder,
    tokenizer: &ClipTokenizer,
    text: &str,
    session_time: &mut Duration,
) -> Result<EncodedText, EngineError> {
    const STAGE: &str = "text encoder";
    let (ids, dropped) = tokenizer.encode_counting(text)?;
    if dropped > 0 {
        tracing::warn!(
            dropped,
            max_length = tokenizer.max_length(),
            "prompt truncated: CLIP reads at most {} tokens",
            tokenizer.max_length()
        );
    }
    let shape = [1, ids.len() as i64];
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
        [1, s, w] if *s > 0 && *w > 0 => (*s as usize, *w as usize),
        other => {
            return Err(EngineError::UnexpectedOutput {
                stage: STAGE,
                message: format!("hidden state of shape {other:?}, expected [1, seq, width]"),
            })
        }
    };
    let pooled = match outputs.next() {
        Some(p) => match p.shape.as_slice() {
            [1, w] if *w > 0 => Some(p.data),
            other => {
                return Err(EngineError::UnexpectedOutput {
                    stage: STAGE,
                    message: format!("text_embeds of shape {other:?}, expected [1, width]"),
                })
            }
        },
        None => None,
    };
    Ok(EncodedText {
        hidden: hidden.data,
        seq,
        width,
        pooled,
    })
}

/// Encode `text` with the first encoder and `text_2` with the second, concatenated.
fn encode_pair(
    model: &SdxlModel,
    text: &str,
    text_2: &str,
    session_time: &mut Duration,
) -> Result<Embedding, EngineError> {
    let no_pooled = || EngineError::UnexpectedOutput {
        stage: "text encoder",
        message: "no text_embeds from text_encoder_2".to_owned(),
    };
    let Some((encoder, tokenizer)) = model.text_encoder.as_ref().zip(model.tokenizer.as_ref())
    else {
        let b = encode_one(
            &model.text_encoder_2,
            &model.tokenizer_2,
            text,
            session_time,
        )?;
        return Ok(Embedding {
            pooled: b.pooled.ok_or_else(no_pooled)?,
            hidden: b.hidden,
            seq: b.seq,
            width: b.width,
        });
    };
    let a = encode_one(encoder, tokenizer, text, session_time)?;
    let b = encode_one(
        &model.text_encoder_2,
        &model.tokenizer_2,
        text_2,
        session_time,
    )?;
    if a.seq != b.seq {
        return Err(EngineError::UnexpectedOutput {
            stage: "text encoder",
            message: format!("sequence lengths {} and {} that differ", a.seq, b.seq),
        });
    }
    let pooled = b.pooled.ok_or_else(no_pooled)?;
    let width = a.width + b.width;
    let mut hidden = Vec::with_capacity(a.seq * width);
    for (row_a, row_b) in a
        .hidden
        .chunks_exact(a.width)
        .zip(b.hidden.chunks_exact(b.width))
    {
        hidden.extend_from_slice(row_a);
        hidden.extend_from_slice(row_b);
    }
    Ok(Embedding {
        hidden,
        pooled,
        seq: a.seq,
        width,
    })
}

/// Encode the prompts of a request; `guidance` says whether negative conditioning is needed.
pub fn encode_prompts(
    model: &SdxlModel,
    texts: &PromptTexts<'_>,
    guidance: bool,
) -> Result<Conditioning, EngineError> {
    let mut session_time = Duration::ZERO;
    let prompt_2 = non_empty(texts.prompt_2).unwrap_or(texts.prompt);
    let positive = encode_pair(model, texts.prompt, prompt_2, &mut session_time)?;
    let negative = if !guidance {
        None
    } else if texts.negative_prompt.is_none() && model.config.force_zeros_for_empty_prompt {
        Some(Embedding::zeros_like(&positive))
    } else {
        let negative = texts.negative_prompt.unwrap_or("");
        let negative_2 = non_empty(texts.negative_prompt_2).unwrap_or(negative);
        Some(encode_pair(model, negative, negative_2, &mut session_time)?)
    };
    Ok(Conditioning {
        positive,
        negative,
        session_time,
    })
}
