//! The CLIP tokenizer of SDXL's two text encoders, built with Hugging Face `tokenizers` from an
//! export's `vocab.json` and `merges.txt` (exports carry no `tokenizer.json`), with the special
//! tokens and length from `special_tokens_map.json` / `tokenizer_config.json`.
//!
//! It reproduces transformers' `CLIPTokenizer` token for token:
//! - normalisation: Unicode NFC, every run of whitespace to one space, lowercase;
//! - pre-tokenisation: CLIP's regex (special tokens, English contractions, letter runs, single
//!   digits, runs of other non-space characters; the spaces are dropped), then byte-level mapping;
//! - BPE with the `</w>` end-of-word suffix;
//! - the special tokens (BOS, EOS, unknown and the pad token) are matched in the text, as
//!   transformers registers them as special added tokens (in the raw text, or in the normalised
//!   text for those declared `normalized`). `tokenizer_2` of SDXL pads with `!`, so a literal
//!   `!` in a prompt becomes id 0 there, exactly as in diffusers;
//! - `[BOS] text [EOS]`, the text truncated so that EOS is always kept, then padded with the
//!   tokenizer's own pad token to the model length (77).

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::EngineError;

/// CLIP's pre-tokenisation pattern (the matches are kept, everything else is dropped).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const DEFAULT_MAX_LENGTH: usize = 77;

/// A CLIP BPE tokenizer with fixed-length output.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

/// A special token as the configuration files declare it: a plain string, or an object with
/// `content` and matching flags.
#[derive(Debug, Clone, PartialEq)]
struct SpecialToken {
    content: String,
    /// Matched against the normalised (lowercased) text rather than the raw text.
    normalized: bool,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

impl SpecialToken {
    fn plain(content: &str) -> Self {
        Self {
            content: content.to_owned(),
            normalized: false,
            lstrip: false,
            rstrip: false,
            single_word: false,
        }
    }

    fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::String(s) => Some(Self::plain(s)),
            Value::Object(o) => {
                let flag = |k: &str| o.get(k).and_then(Value::as_bool).unwrap_or(false);
                Some(Self {
                    content: o.get("content")?.as_str()?.to_owned(),
                    normalized: flag("normalized"),
                    lstrip: flag("lstrip"),
                    rstrip: flag("rstrip"),
                    single_word: flag("single_word"),
                })
            }
            _ => None,
        }
    }

    fn added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), true)
            .normalized(self.normalized)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .single_word(self.single_word)
    }
}

fn read_optional(path: &Path) -> Result<Option<Value>, EngineError> {
    if path.is_file() {
        super::model::read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

impl ClipTokenizer {
    /// Build the tokenizer from the files in `dir` (`vocab.json`, `merges.txt`, and optionally
    /// `special_tokens_map.json` and `tokenizer_config.json`).
    pub fn from_dir(dir: &Path) -> Result<Self, EngineError> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for p in [&vocab, &merges] {
            if !p.is_file() {
                return Err(EngineError::ModelFileMissing { path: p.clone() });
            }
        }
        let special_map = read_optional(&dir.join("special_tokens_map.json"))?;
        let config = read_optional(&dir.join("tokenizer_config.json"))?;
        // special_tokens_map.json wins over tokenizer_config.json, as in transformers.
        let lookup = |key: &str| -> Option<SpecialToken> {
            [special_map.as_ref(), config.as_ref()]
                .into_iter()
                .flatten()
                .find_map(|j| j.get(key).and_then(SpecialToken::from_json))
        };
        let bos = lookup("bos_token").unwrap_or_else(|| SpecialToken::plain(DEFAULT_BOS));
        let eos = lookup("eos_token").unwrap_or_else(|| SpecialToken::plain(DEFAULT_EOS));
        let unk = lookup("unk_token").unwrap_or_else(|| SpecialToken::plain(DEFAULT_EOS));
        let pad = lookup("pad_token").unwrap_or_else(|| eos.clone());
        let max_length = config
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| (3..=4096).contains(&n))
            .unwrap_or(DEFAULT_MAX_LENGTH);
        Self::build(
            dir,
            &Files {
                vocab: &vocab,
                merges: &merges,
            },
            &Specials {
                bos: &bos,
                eos: &eos,
                unk: &unk,
                pad: &pad,
            },
            max_length,
        )
    }

    fn build(
        dir: &Path,
        files: &Files<'_>,
        specials: &Specials<'_>,
        max_length: usize,
    ) -> Result<Self, EngineError> {
        let invalid = |message: String| EngineError::Tokenizer {
            path: dir.to_path_buf(),
            message,
        };
        let path_str = |p: &Path| {
            p.to_str()
                .map(str::to_owned)
                .ok_or_else(|| invalid(format!("path {} is not UTF-8", p.display())))
        };
        let bpe = BPE::from_file(&path_str(files.vocab)?, &path_str(files.merges)?)
            .unk_token(specials.unk.content.clone())
            .end_of_word_suffix("</w>".to_owned())
            .build()
            .map_err(|e| invalid(format!("cannot read vocab.json / merges.txt: {e}")))?;
        let replace = Replace::new(ReplacePattern::Regex(r"\s+".to_owned()), " ")
            .map_err(|e| invalid(format!("whitespace pattern: {e}")))?;
        let normalizer =
            NormalizerSequence::new(vec![NFC.into(), replace.into(), Lowercase.into()]);
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.to_owned()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| invalid(format!("pre-tokenizer pattern: {e}")))?;
        let pre_tokenizer =
            PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);

        let mut inner = Tokenizer::new(bpe);
        inner.with_normalizer(Some(normalizer));
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        // Registered in transformers' order; when two entries share a content (CLIP's EOS, unknown
        // and pad tokens), the last one's matching flags win, as in transformers.
        let added: Vec<AddedToken> = [specials.bos, specials.eos, specials.unk, specials.pad]
            .iter()
            .map(|t| t.added_token())
            .collect();
        inner.add_special_tokens(&added);
        let id = |t: &SpecialToken| {
            inner.token_to_id(&t.content).ok_or_else(|| {
                invalid(format!(
                    "special token {:?} is not in vocab.json",
                    t.content
                ))
            })
        };
        Ok(Self {
            bos: id(specials.bos)?,
            eos: id(specials.eos)?,
            pad: id(specials.pad)?,
            inner,
            max_length,
        })
    }

    /// Token ids of `text`: BOS, the text's tokens (truncated to leave room), EOS, padding;
    /// always exactly [`max_length`](Self::max_length) ids.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, EngineError> {
        self.encode_counting(text).map(|(ids, _)| ids)
    }

    /// Like [`encode`](Self::encode), also returning how many of the text's tokens were cut off.
    pub fn encode_counting(&self, text: &str) -> Result<(Vec<i64>, usize), EngineError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|source| EngineError::Tokenize { source })?;
        let room = self.max_length - 2;
        let all = encoding.get_ids();
        let body = &all[..all.len().min(room)];
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(i64::from(self.bos));
        ids.extend(body.iter().map(|&i| i64::from(i)));
        ids.push(i64::from(self.eos));
        ids.resize(self.max_length, i64::from(self.pad));
        Ok((ids, all.len() - body.len()))
    }

    /// The text's token ids, without BOS, EOS or padding and without truncation.
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|source| EngineError::Tokenize { source })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The fixed output length (77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id of the beginning-of-text token.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// Id of the end-of-text token.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Id used for padding.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }
}

struct Files<'a> {
    vocab: &'a Path,
    merges: &'a Path,
}

struct Specials<'a> {
    bos: &'a SpecialToken,
    eos: &'a SpecialToken,
    unk: &'a SpecialToken,
    pad: &'a SpecialToken,
}
