//! Prompt weighting and long prompts on the tiny pipeline, against embeddings computed by hand
//! from the plain (diffusers) encoding of the same tokens: token rows scaled by their weight with
//! the mean restored per encoder, chunks of 75 tokens concatenated along the sequence axis.

mod common;

use std::ops::ControlFlow;

use sdxl_worker::engine::prompt_weighting;
use sdxl_worker::engine::text::{self, Conditioning, Embedding, PromptTexts};
use sdxl_worker::engine::SdxlModel;

const TOL: f32 = 1e-5;

fn model() -> &'static SdxlModel {
    common::tiny_engine().model()
}

fn texts<'a>(prompt: &'a str, negative: Option<&'a str>) -> PromptTexts<'a> {
    PromptTexts {
        prompt,
        prompt_2: None,
        negative_prompt: negative,
        negative_prompt_2: None,
    }
}

fn plain(prompt: &str) -> Embedding {
    text::encode_prompts(model(), &texts(prompt, None), false)
        .expect("plain encoding")
        .positive
}

fn weighted(prompt: &str, negative: Option<&str>, guidance: bool) -> Conditioning {
    prompt_weighting::encode_prompts(model(), &texts(prompt, negative), guidance)
        .expect("weighted encoding")
}

/// Widths of the two encoders' parts of a concatenated hidden state.
fn widths() -> (usize, usize) {
    let w1 = model()
        .text_encoder
        .as_ref()
        .and_then(|e| e.hidden_width())
        .expect("fixed width");
    let w2 = model().text_encoder_2.hidden_width().expect("fixed width");
    (w1, w2)
}

#[track_caller]
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= TOL, "{what}: max difference {worst}");
}

/// By hand: scale row `row` of each encoder's part by `weight`, then rescale that part so its
/// sum (hence mean) is what it was.
fn weight_row_by_hand(e: &Embedding, row: usize, weight: f32) -> Vec<f32> {
    let (w1, w2) = widths();
    let mut out = e.hidden.clone();
    for (offset, width) in [(0, w1), (w1, w2)] {
        let part =
            |v: &[f32], r: usize| v[r * e.width + offset..r * e.width + offset + width].to_vec();
        let before: f64 = (0..e.seq).flat_map(|r| part(&out, r)).map(f64::from).sum();
        for c in 0..width {
            out[row * e.width + offset + c] *= weight;
        }
        let after: f64 = (0..e.seq).flat_map(|r| part(&out, r)).map(f64::from).sum();
        let scale = (before / after) as f32;
        for r in 0..e.seq {
            for c in 0..width {
                out[r * e.width + offset + c] *= scale;
            }
        }
    }
    out
}

#[test]
fn a_plain_short_prompt_encodes_exactly_as_diffusers_does() {
    let prompt = "a photograph of an astronaut riding a horse";
    let w = weighted(prompt, Some("blurry"), true);
    let p = plain(prompt);
    assert_eq!(w.positive, p);
    let neg = w.negative.expect("guidance");
    assert_eq!(neg, plain("blurry"));
}

#[test]
fn an_explicit_weight_scales_its_token_and_keeps_the_mean() {
    // "a red fox" is [BOS, a, red, fox, EOS, pad...] for both tokenizers: "red" is row 2.
    let base = plain("a red fox");
    let want = weight_row_by_hand(&base, 2, 1.5);
    let got = weighted("a (red:1.5) fox", None, false).positive;
    assert_eq!((got.seq, got.width), (base.seq, base.width));
    assert_close(&got.hidden, &want, "(red:1.5)");
    // The pooled embedding is never weighted.
    assert_eq!(got.pooled, base.pooled);
    // (red) is 1.1, [red] is 1/1.1, ((red)) is 1.21.
    for (prompt, weight) in [
        ("a (red) fox", 1.1f32),
        ("a [red] fox", 1.0 / 1.1),
        ("a ((red)) fox", 1.1 * 1.1),
    ] {
        let got = weighted(prompt, None, false).positive;
        assert_close(&got.hidden, &weight_row_by_hand(&base, 2, weight), prompt);
    }
    // The weight changes the conditioning.
    assert_ne!(got.hidden, base.hidden);
}

#[test]
fn long_prompts_are_encoded_in_chunks_of_75_tokens() {
    // "cat" and "dog" are one token each: 75 + 25 tokens make two chunks.
    let first: Vec<&str> = vec!["cat"; 75];
    let second: Vec<&str> = vec!["dog"; 25];
    let prompt = format!("{} {}", first.join(" "), second.join(" "));
    let chunk1 = plain(&first.join(" "));
    let chunk2 = plain(&second.join(" "));
    let got = weighted(&prompt, Some("blurry"), true);
    let pos = &got.positive;
    assert_eq!(pos.seq, 2 * 77);
    let want: Vec<f32> = chunk1
        .hidden
        .iter()
        .chain(&chunk2.hidden)
        .copied()
        .collect();
    assert_close(&pos.hidden, &want, "two chunks");
    assert_eq!(pos.pooled, chunk1.pooled, "pooled from the first chunk");
    // The negative prompt is padded with the encoding of "" to the same length.
    let neg = got.negative.expect("guidance");
    let want: Vec<f32> = plain("blurry")
        .hidden
        .iter()
        .chain(&plain("").hidden)
        .copied()
        .collect();
    assert_close(&neg.hidden, &want, "negative padded with an empty chunk");
    // An absent negative prompt is all zeros at the full length.
    let zeros = weighted(&prompt, None, true).negative.expect("guidance");
    assert_eq!(zeros.seq, 2 * 77);
    assert!(zeros.hidden.iter().all(|&v| v == 0.0));
    // BREAK starts a new chunk.
    let broken = weighted("cat BREAK dog", None, false).positive;
    let want: Vec<f32> = plain("cat")
        .hidden
        .iter()
        .chain(&plain("dog").hidden)
        .copied()
        .collect();
    assert_close(&broken.hidden, &want, "BREAK");
}

#[test]
fn a_long_weighted_prompt_generates_beyond_the_truncation() {
    let engine = common::tiny_engine();
    let long = format!("{} a red fox", vec!["cat"; 80].join(" "));
    let mut request = common::basic_request();
    request.prompt = long;
    request.steps = 2;
    let truncated = engine
        .generate(&request, &mut |_| ControlFlow::Continue(()))
        .expect("plain");
    request.controls.prompt_weighting = true;
    let chunked = engine
        .generate(&request, &mut |_| ControlFlow::Continue(()))
        .expect("chunked");
    assert!(chunked.latents.iter().all(|v| v.is_finite()));
    // The words past token 75 now reach the UNet.
    assert_ne!(chunked.latents, truncated.latents);
}
