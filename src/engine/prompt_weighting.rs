//! Prompt weighting and long prompts, as A1111's web UI reads prompts.
//!
//! Syntax (the text between markers keeps its letters; markers are removed):
//! - `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1; they nest, so
//!   `((text))` is 1.21;
//! - `(text:1.3)` multiplies it by 1.3 (any decimal number, also below 1 or negative);
//! - `\(`, `\)`, `\[`, `\]` and `\\` are literal characters;
//! - a bracket left open applies to the end of the prompt; a closing bracket without an opening
//!   one is literal text, as is `:1.3)` outside parentheses;
//! - the word `BREAK` (upper case, on its own) ends the current 75-token chunk.
//!
//! What is computed, for each text and each of the two text encoders:
//! 1. Every run of text with one weight is tokenized on its own (CLIP BPE, no special tokens) and
//!    each of its tokens gets that weight.
//! 2. The tokens are cut into chunks of `max_length - 2` tokens (75 for CLIP), in order, with no
//!    look-back for commas; `BREAK` starts a new chunk. Each chunk becomes
//!    `[BOS] tokens [EOS] pad…` of `max_length` (77) ids with the tokenizer's own pad token, the
//!    same layout as an unweighted prompt; BOS, EOS and padding have weight 1.
//! 3. All texts of a request are brought to the same chunk count (the largest among the prompt,
//!    `prompt_2` and the negative prompts, over both tokenizers) by appending empty chunks
//!    (`[BOS] [EOS] pad…`, the encoding of "").
//! 4. Each chunk is encoded on its own; its penultimate hidden state `z` (`[77, width]`) is
//!    weighted: `z'[i] = z[i] · w[i]` for every token position `i`, then scaled by
//!    `mean(z) / mean(z')` (means over all of the chunk's values, computed in f64) so that the
//!    overall mean is restored, as A1111 does. Chunks whose weights are all 1 are left as they are.
//! 5. The chunks are concatenated along the sequence axis (`[77·k, width]`), and the two encoders'
//!    results along the feature axis as for any SDXL prompt. The pooled embedding is the first
//!    chunk's `text_embeds` from `text_encoder_2`, unweighted.
//!
//! A prompt without markers that fits in 75 tokens therefore gives exactly the embeddings of the
//! plain encoding ([`super::text`]). `force_zeros_for_empty_prompt` applies as there: an absent
//! negative prompt is all zeros, at the full chunked length.

use std::time::Duration;

use super::model::{SdxlModel, TextEncoder};
use super::tensor;
use super::text::{Conditioning, Embedding, PromptTexts};
use super::tokenizer::ClipTokenizer;
use super::EngineError;

const STAGE: &str = "text encoder";
const ROUND_MULTIPLIER: f64 = 1.1;
const SQUARE_MULTIPLIER: f64 = 1.0 / 1.1;

/// A run of prompt text with one weight, or a chunk break.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Text { text: String, weight: f64 },
    Break,
}

impl Segment {
    fn text(text: &str, weight: f64) -> Self {
        Segment::Text {
            text: text.to_owned(),
            weight,
        }
    }
}

/// Split a prompt into weighted runs of text (adjacent runs of equal weight merged).
pub fn parse(prompt: &str) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for (i, part) in split_breaks(prompt).into_iter().enumerate() {
        if i > 0 {
            out.push(Segment::Break);
        }
        out.extend(parse_attention(part));
    }
    merge(out)
}

/// Split on the word `BREAK` (surrounding white space removed).
fn split_breaks(prompt: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let bytes = prompt.as_bytes();
    let mut i = 0;
    while let Some(pos) = prompt[i..].find("BREAK") {
        let at = i + pos;
        let end = at + "BREAK".len();
        let word_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let before_ok = at == 0 || !word_char(bytes[at - 1]);
        let after_ok = end == bytes.len() || !word_char(bytes[end]);
        if before_ok && after_ok {
            parts.push(prompt[start..at].trim_end());
            start = end;
            while start < bytes.len() && prompt[start..].starts_with(char::is_whitespace) {
                start += prompt[start..].chars().next().map_or(1, char::len_utf8);
            }
            i = start.max(end);
        } else {
            i = end;
        }
    }
    parts.push(&prompt[start..]);
    parts
}

/// Weighted runs of one BREAK-free part.
fn parse_attention(text: &str) -> Vec<Segment> {
    // (text, weight) pairs; brackets remember where their run starts.
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, by: f64| {
        for item in &mut res[from..] {
            item.1 *= by;
        }
    };
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        match c {
            '\\' => {
                let next = rest[1..].chars().next();
                match next {
                    Some(n @ ('(' | ')' | '[' | ']' | '\\')) => {
                        res.push((n.to_string(), 1.0));
                        rest = &rest[2..];
                    }
                    _ => {
                        res.push(("\\".to_owned(), 1.0));
                        rest = &rest[1..];
                    }
                }
            }
            '(' => {
                round.push(res.len());
                rest = &rest[1..];
            }
            '[' => {
                square.push(res.len());
                rest = &rest[1..];
            }
            ')' if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, ROUND_MULTIPLIER);
                rest = &rest[1..];
            }
            ']' if !square.is_empty() => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, SQUARE_MULTIPLIER);
                rest = &rest[1..];
            }
            ':' => match explicit_weight(rest) {
                Some((weight, len)) if !round.is_empty() => {
                    let from = round.pop().unwrap_or(0);
                    multiply(&mut res, from, weight);
                    rest = &rest[len..];
                }
                _ => {
                    res.push((":".to_owned(), 1.0));
                    rest = &rest[1..];
                }
            },
            ')' | ']' => {
                res.push((c.to_string(), 1.0));
                rest = &rest[1..];
            }
            _ => {
                let end = rest
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(rest.len());
                res.push((rest[..end].to_owned(), 1.0));
                rest = &rest[end..];
            }
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND_MULTIPLIER);
    }
    for from in square {
        multiply(&mut res, from, SQUARE_MULTIPLIER);
    }
    res.into_iter()
        .map(|(text, weight)| Segment::Text { text, weight })
        .collect()
}

/// `:<number>)` with optional white space around the number: the weight and the bytes consumed.
fn explicit_weight(s: &str) -> Option<(f64, usize)> {
    let body = s.strip_prefix(':')?;
    let trimmed = body.trim_start();
    let skipped = body.len() - trimmed.len();
    let num_len = trimmed
        .char_indices()
        .take_while(|&(i, c)| c.is_ascii_digit() || c == '.' || (i == 0 && (c == '+' || c == '-')))
        .count();
    let number = &trimmed[..num_len];
    let after = trimmed[num_len..].trim_start();
    if !after.starts_with(')') {
        return None;
    }
    let weight: f64 = number.parse().ok().filter(|w: &f64| w.is_finite())?;
    let consumed = 1 + skipped + num_len + (trimmed[num_len..].len() - after.len()) + 1;
    Some((weight, consumed))
}

fn merge(segments: Vec<Segment>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len());
    for seg in segments {
        match (&seg, out.last_mut()) {
            (Segment::Text { text, .. }, _) if text.is_empty() => {}
            (
                Segment::Text { text, weight },
                Some(Segment::Text {
                    text: last,
                    weight: lw,
                }),
            ) if lw == weight => last.push_str(text),
            _ => out.push(seg),
        }
    }
    if out.is_empty() {
        out.push(Segment::text("", 1.0));
    }
    out
}

/// A text's tokens for one tokenizer, cut into chunks: each chunk's token ids and weights
/// (without BOS/EOS/padding).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChunks {
    pub chunks: Vec<(Vec<u32>, Vec<f64>)>,
}

/// Tokenize a prompt's weighted runs and cut the tokens into chunks of `max_length - 2`.
pub fn chunk_tokens(tokenizer: &ClipTokenizer, prompt: &str) -> Result<TokenChunks, EngineError> {
    let room = tokenizer.max_length() - 2;
    let mut chunks = vec![(Vec::new(), Vec::new())];
    for segment in parse(prompt) {
        match segment {
            Segment::Break => chunks.push((Vec::new(), Vec::new())),
            Segment::Text { text, weight } => {
                for id in tokenizer.tokens(&text)? {
                    if chunks.last().is_some_and(|c| c.0.len() == room) {
                        chunks.push((Vec::new(), Vec::new()));
                    }
                    if let Some((ids, weights)) = chunks.last_mut() {
                        ids.push(id);
                        weights.push(weight);
                    }
                }
            }
        }
    }
    Ok(TokenChunks { chunks })
}

/// The full `max_length` ids and weights of one chunk (`None`: an empty chunk).
fn chunk_row(
    tokenizer: &ClipTokenizer,
    chunk: Option<&(Vec<u32>, Vec<f64>)>,
) -> (Vec<i64>, Vec<f64>) {
    let n = tokenizer.max_length();
    let mut ids = Vec::with_capacity(n);
    let mut weights = Vec::with_capacity(n);
    ids.push(i64::from(tokenizer.bos_id()));
    weights.push(1.0);
    if let Some((toks, ws)) = chunk {
        ids.extend(toks.iter().map(|&t| i64::from(t)));
        weights.extend_from_slice(ws);
    }
    ids.push(i64::from(tokenizer.eos_id()));
    ids.resize(n, i64::from(tokenizer.pad_id()));
    weights.resize(n, 1.0);
    (ids, weights)
}

/// Apply per-token weights to one chunk's hidden state (`[seq, width]`) and restore its mean.
pub fn weight_chunk(hidden: &mut [f32], weights: &[f64], width: usize) {
    if weights.iter().all(|&w| w == 1.0) {
        return;
    }
    let original: f64 = hidden.iter().map(|&v| f64::from(v)).sum::<f64>();
    for (row, &w) in hidden.chunks_exact_mut(width).zip(weights) {
        for v in row {
            *v = (f64::from(*v) * w) as f32;
        }
    }
    let weighted: f64 = hidden.iter().map(|&v| f64::from(v)).sum::<f64>();
    if weighted != 0.0 && weighted.is_finite() {
        let scale = original / weighted;
        for v in hidden.iter_mut() {
            *v = (f64::from(*v) * scale) as f32;
        }
    }
}

struct EncodedChunks {
    /// `[chunks · seq, width]`.
    hidden: Vec<f32>,
    width: usize,
    /// The first chunk's pooled embedding (text_encoder_2).
    pooled: Option<Vec<f32>>,
}

fn encode_chunks(
    encoder: &TextEncoder,
    tokenizer: &ClipTokenizer,
    tokens: &TokenChunks,
    count: usize,
    session_time: &mut Duration,
) -> Result<EncodedChunks, EngineError> {
    let seq = tokenizer.max_length();
    let mut hidden = Vec::new();
    let mut width = 0;
    let mut pooled = None;
    for k in 0..count {
        let (ids, weights) = chunk_row(tokenizer, tokens.chunks.get(k));
        let value = tensor::int_value(encoder.input_ids.elem, &[1, seq as i64], &ids).map_err(
            |source| EngineError::Inference {
                stage: STAGE,
                source,
            },
        )?;
        let mut wanted = vec![encoder.penultimate.as_str()];
        if let Some(p) = &encoder.pooled {
            wanted.push(p.as_str());
        }
        let result = encoder
            .component
            .run(STAGE, vec![("input_ids", value.into())], &wanted)?;
        *session_time += result.session_time;
        let mut outputs = result.outputs.into_iter();
        let h = outputs
            .next()
            .ok_or_else(|| EngineError::UnexpectedOutput {
                stage: STAGE,
                message: "no hidden state".to_owned(),
            })?;
        width = match h.shape.as_slice() {
            [1, s, w] if *s as usize == seq && *w > 0 => *w as usize,
            other => {
                return Err(EngineError::UnexpectedOutput {
                    stage: STAGE,
                    message: format!("hidden state of shape {other:?}, expected [1, {seq}, width]"),
                })
            }
        };
        let mut z = h.data;
        weight_chunk(&mut z, &weights, width);
        hidden.extend_from_slice(&z);
        if k == 0 {
            pooled = outputs.next().map(|p| p.data);
        }
    }
    Ok(EncodedChunks {
        hidden,
        width,
        pooled,
    })
}

/// Both encoders' tokens of one text pair (a refiner, with `text_encoder_2` only, reads the
/// first text with it, as diffusers does).
struct PairTokens {
    first: Option<TokenChunks>,
    second: TokenChunks,
}

impl PairTokens {
    fn new(model: &SdxlModel, text: &str, text_2: &str) -> Result<Self, EngineError> {
        Ok(match &model.tokenizer {
            Some(tokenizer) => Self {
                first: Some(chunk_tokens(tokenizer, text)?),
                second: chunk_tokens(&model.tokenizer_2, text_2)?,
            },
            None => Self {
                first: None,
                second: chunk_tokens(&model.tokenizer_2, text)?,
            },
        })
    }

    fn chunks(&self) -> usize {
        let first = self.first.as_ref().map_or(0, |f| f.chunks.len());
        first.max(self.second.chunks.len())
    }
}

fn encode_pair(
    model: &SdxlModel,
    tokens: &PairTokens,
    count: usize,
    session_time: &mut Duration,
) -> Result<Embedding, EngineError> {
    let b = encode_chunks(
        &model.text_encoder_2,
        &model.tokenizer_2,
        &tokens.second,
        count,
        session_time,
    )?;
    let no_pooled = || EngineError::UnexpectedOutput {
        stage: STAGE,
        message: "no text_embeds from text_encoder_2".to_owned(),
    };
    let (Some(encoder), Some(tokenizer), Some(first)) = (
        model.text_encoder.as_ref(),
        model.tokenizer.as_ref(),
        tokens.first.as_ref(),
    ) else {
        let seq = b.hidden.len() / b.width.max(1);
        return Ok(Embedding {
            pooled: b.pooled.ok_or_else(no_pooled)?,
            hidden: b.hidden,
            seq,
            width: b.width,
        });
    };
    let a = encode_chunks(encoder, tokenizer, first, count, session_time)?;
    let seq_a = a.hidden.len() / a.width.max(1);
    let seq_b = b.hidden.len() / b.width.max(1);
    if seq_a != seq_b {
        return Err(EngineError::UnexpectedOutput {
            stage: STAGE,
            message: format!("sequence lengths {seq_a} and {seq_b} that differ"),
        });
    }
    let pooled = b.pooled.ok_or_else(no_pooled)?;
    let width = a.width + b.width;
    Ok(Embedding {
        hidden: super::text::concat_hidden(&a.hidden, a.width, &b.hidden, b.width),
        pooled,
        seq: seq_a,
        width,
    })
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

/// Encode a request's prompts with weights and chunking (see the module docs); the same
/// fallbacks as [`super::text::encode_prompts`].
pub fn encode_prompts(
    model: &SdxlModel,
    texts: &PromptTexts<'_>,
    guidance: bool,
) -> Result<Conditioning, EngineError> {
    let mut session_time = Duration::ZERO;
    let prompt_2 = non_empty(texts.prompt_2).unwrap_or(texts.prompt);
    let positive = PairTokens::new(model, texts.prompt, prompt_2)?;
    let zeros = texts.negative_prompt.is_none() && model.config.force_zeros_for_empty_prompt;
    let negative = if guidance && !zeros {
        let negative = texts.negative_prompt.unwrap_or("");
        let negative_2 = non_empty(texts.negative_prompt_2).unwrap_or(negative);
        Some(PairTokens::new(model, negative, negative_2)?)
    } else {
        None
    };
    let count = positive
        .chunks()
        .max(negative.as_ref().map_or(1, PairTokens::chunks));
    let pos = encode_pair(model, &positive, count, &mut session_time)?;
    let neg = match negative {
        Some(tokens) => Some(encode_pair(model, &tokens, count, &mut session_time)?),
        None if guidance => Some(Embedding {
            hidden: vec![0.0; pos.hidden.len()],
            pooled: vec![0.0; pos.pooled.len()],
            seq: pos.seq,
            width: pos.width,
        }),
        None => None,
    };
    Ok(Conditioning {
        positive: pos,
        negative: neg,
        session_time,
    })
}

/// Whether weighting leaves the request's texts as the plain encoding ([`super::text`]) reads
/// them: each text that may be encoded has no weighting syntax and fits in one chunk of every
/// tokenizer. Such a request's prompts may then be encoded along with other requests'.
pub fn reads_as_plain(model: &SdxlModel, texts: &PromptTexts<'_>, guidance: bool) -> bool {
    let mut all = vec![
        texts.prompt,
        non_empty(texts.prompt_2).unwrap_or(texts.prompt),
    ];
    if guidance {
        let negative = texts.negative_prompt.unwrap_or("");
        all.extend([
            negative,
            non_empty(texts.negative_prompt_2).unwrap_or(negative),
        ]);
    }
    let tokenizers: Vec<&ClipTokenizer> =
        model.tokenizer.iter().chain([&model.tokenizer_2]).collect();
    all.into_iter().all(|text| {
        let unmarked = match parse(text).as_slice() {
            [] => text.is_empty(),
            [Segment::Text { text: t, weight }] => t == text && *weight == 1.0,
            _ => false,
        };
        unmarked
            && tokenizers.iter().all(|tokenizer| {
                tokenizer
                    .tokens(text)
                    .is_ok_and(|ids| ids.len() <= tokenizer.max_length() - 2)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str, weight: f64) -> Segment {
        Segment::text(text, weight)
    }

    fn close(a: &[Segment], b: &[Segment]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| match (x, y) {
                (
                    Segment::Text {
                        text: ta,
                        weight: wa,
                    },
                    Segment::Text {
                        text: tb,
                        weight: wb,
                    },
                ) => ta == tb && (wa - wb).abs() < 1e-12,
                (Segment::Break, Segment::Break) => true,
                _ => false,
            })
    }

    #[track_caller]
    fn check(prompt: &str, expected: &[Segment]) {
        let got = parse(prompt);
        assert!(close(&got, expected), "{prompt:?}: {got:?}");
    }

    #[test]
    fn the_a1111_syntax() {
        check("a cat", &[t("a cat", 1.0)]);
        check(
            "a (red) fox",
            &[t("a ", 1.0), t("red", 1.1), t(" fox", 1.0)],
        );
        check(
            "a [red] fox",
            &[t("a ", 1.0), t("red", 1.0 / 1.1), t(" fox", 1.0)],
        );
        check("((red))", &[t("red", 1.1 * 1.1)]);
        check("(red:1.5) fox", &[t("red", 1.5), t(" fox", 1.0)]);
        check("( red : 0.25 )", &[t(" red ", 0.25)]);
        check("(a (b:2) c)", &[t("a ", 1.1), t("b", 2.2), t(" c", 1.1)]);
        check("[(red:1.5)]", &[t("red", 1.5 / 1.1)]);
        check(r"\(literal\) \[x\]", &[t("(literal) [x]", 1.0)]);
        check("open (bracket", &[t("open ", 1.0), t("bracket", 1.1)]);
        check("stray) ] x:1.2)", &[t("stray) ] x:1.2)", 1.0)]);
        check("(x:abc)", &[t("x:abc", 1.1)]);
        check("", &[t("", 1.0)]);
        check("()", &[t("", 1.0)]);
        check("a BREAK b", &[t("a", 1.0), Segment::Break, t("b", 1.0)]);
        check("BREAKFAST", &[t("BREAKFAST", 1.0)]);
        check("(ü:1.2)é", &[t("ü", 1.2), t("é", 1.0)]);
    }

    #[test]
    fn weighting_scales_rows_and_restores_the_mean() {
        let width = 2;
        let mut z = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let weights = [1.0, 2.0, 1.0];
        let mean_before: f32 = z.iter().sum::<f32>() / 6.0;
        weight_chunk(&mut z, &weights, width);
        // Row 1 doubled, then everything scaled by 21 / 28.
        let s = 21.0 / 28.0;
        let expected = [1.0 * s, 2.0 * s, 6.0 * s, 8.0 * s, 5.0 * s, 6.0 * s];
        for (a, b) in z.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{z:?}");
        }
        let mean_after: f32 = z.iter().sum::<f32>() / 6.0;
        assert!((mean_before - mean_after).abs() < 1e-6);
        let mut same = vec![1.0f32, 2.0];
        weight_chunk(&mut same, &[1.0], 2);
        assert_eq!(same, [1.0, 2.0]);
    }
}
