//! Dynamic batching on the tiny pipeline (CPU): a run's images and latents are identical
//! whether it ran alone or batched with others, whatever the others ask for; runs that cannot
//! share a batch are grouped apart; one run's cancellation or bad request leaves the others
//! untouched.

mod common;

use std::ops::ControlFlow;

use sdxl_worker::engine::{GenerateOutput, GenerateRequest, Progress, SchedulerKind};

fn solo(request: &GenerateRequest) -> GenerateOutput {
    common::tiny_engine()
        .generate(request, &mut |_| ControlFlow::Continue(()))
        .expect("solo run")
}

fn batch(requests: &[GenerateRequest]) -> Vec<GenerateOutput> {
    let refs: Vec<&GenerateRequest> = requests.iter().collect();
    common::tiny_engine()
        .generate_batch(&refs, &mut |_, _| ControlFlow::Continue(()))
        .into_iter()
        .map(|r| r.expect("batched run"))
        .collect()
}

fn assert_same(batched: &GenerateOutput, alone: &GenerateOutput, what: &str) {
    assert_eq!(batched.latents, alone.latents, "{what}: latents differ");
    assert_eq!(batched.images, alone.images, "{what}: images differ");
}

/// Three runs that differ in everything a batch lets differ.
fn mixed_requests(scheduler: SchedulerKind) -> Vec<GenerateRequest> {
    let mut a = common::basic_request();
    a.scheduler = scheduler;
    a.seed = 11;
    let mut b = a.clone();
    b.prompt = "a lighthouse on a cliff at dusk, oil painting".into();
    b.negative_prompt = None;
    b.seed = 12;
    b.num_images = 2;
    b.guidance_scale = 8.5;
    b.guidance_rescale = 0.6;
    let mut c = a.clone();
    c.prompt = "a bowl of ramen".into();
    c.prompt_2 = Some("studio lighting".into());
    c.seed = u64::MAX - 3;
    c.original_size = Some((256, 192));
    c.crops_coords_top_left = (8, 4);
    vec![a, b, c]
}

#[test]
fn batched_runs_equal_their_solo_runs_for_every_scheduler() {
    for scheduler in SchedulerKind::ALL {
        let requests = mixed_requests(scheduler);
        let outputs = batch(&requests);
        for (i, (request, batched)) in requests.iter().zip(&outputs).enumerate() {
            assert_eq!(batched.batch_size, 3);
            let alone = solo(request);
            assert_same(batched, &alone, &format!("{scheduler:?} run {i}"));
            assert_eq!(batched.images.len(), request.num_images as usize);
            // One step time per UNet evaluation (Heun evaluates twice per step).
            assert_eq!(batched.timings.per_step.len(), alone.timings.per_step.len());
        }
    }
}

#[test]
fn runs_that_cannot_share_a_batch_are_grouped_apart_and_still_match() {
    let mut requests = mixed_requests(SchedulerKind::Dpmpp2m);
    // Another latent size, no guidance, another step count, another schedule spacing and
    // a long weighted prompt (a longer text sequence): each goes in its own group.
    let mut wide = common::basic_request();
    wide.width = 128;
    wide.seed = 21;
    let mut unguided = common::basic_request();
    unguided.guidance_scale = 1.0;
    unguided.seed = 22;
    let mut longer = common::basic_request();
    longer.steps = 6;
    longer.seed = 23;
    let mut karras = common::basic_request();
    karras.scheduler = SchedulerKind::Dpmpp2mKarras;
    let mut weighted = common::basic_request();
    weighted.controls.prompt_weighting = true;
    weighted.prompt = "(a very detailed:1.3) ".repeat(30);
    requests.extend([wide, unguided, longer, karras, weighted]);
    let outputs = batch(&requests);
    for (i, (request, batched)) in requests.iter().zip(&outputs).enumerate() {
        assert_same(batched, &solo(request), &format!("run {i}"));
    }
    let sizes: Vec<usize> = outputs.iter().map(|o| o.batch_size).collect();
    assert_eq!(sizes, [3, 3, 3, 1, 1, 1, 1, 1]);
}

#[test]
fn cancelling_one_run_leaves_the_others_as_they_would_be_alone() {
    let mut requests = mixed_requests(SchedulerKind::EulerA);
    for r in &mut requests {
        r.steps = 6;
    }
    let refs: Vec<&GenerateRequest> = requests.iter().collect();
    let mut seen: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
    let results = common::tiny_engine().generate_batch(&refs, &mut |run, p: Progress| {
        seen[run].push(p.step);
        assert_eq!(p.total, 6);
        if run == 1 && p.step == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    let err = results[1].as_ref().expect_err("run 1 was cancelled");
    assert_eq!(err.code(), "cancelled");
    assert_eq!(seen[1], [1, 2], "a cancelled run reports no later step");
    for i in [0, 2] {
        assert_eq!(seen[i], [1, 2, 3, 4, 5, 6]);
        let batched = results[i].as_ref().expect("not cancelled");
        assert_same(batched, &solo(&requests[i]), &format!("run {i}"));
    }
}

#[test]
fn a_bad_request_fails_alone() {
    let mut requests = mixed_requests(SchedulerKind::Euler);
    requests[1].height = 65;
    let refs: Vec<&GenerateRequest> = requests.iter().collect();
    let results =
        common::tiny_engine().generate_batch(&refs, &mut |_, _| ControlFlow::Continue(()));
    let err = results[1].as_ref().expect_err("height 65 is invalid");
    assert_eq!(err.code(), "invalid_request");
    for i in [0, 2] {
        let batched = results[i].as_ref().expect("valid");
        assert_same(batched, &solo(&requests[i]), &format!("run {i}"));
    }
}

#[test]
fn a_batch_of_one_is_a_solo_run() {
    let request = common::basic_request();
    let outputs = batch(std::slice::from_ref(&request));
    assert_same(&outputs[0], &solo(&request), "single");
    assert!(common::tiny_engine()
        .generate_batch(&[], &mut |_, _| ControlFlow::Continue(()))
        .is_empty());
}

/// A batch encodes its runs' prompts together (one run of each text encoder for all of them)
/// where weighting would leave the texts as they are, and each run still equals its solo run,
/// weighted, long or guided differently.
#[test]
fn prompts_are_encoded_together_where_weighting_changes_nothing() {
    let mut plain = mixed_requests(SchedulerKind::Euler);
    plain[0].controls.prompt_weighting = true; // no markers, fits in 75 tokens
    let mut weighted = common::basic_request();
    weighted.prompt = "a (lighthouse:1.3) on a [cliff]".into();
    weighted.controls.prompt_weighting = true;
    weighted.seed = 21;
    let mut long = common::basic_request();
    long.prompt = "a very detailed painting of a quiet harbour town at dawn, ".repeat(8);
    long.controls.prompt_weighting = true;
    long.seed = 22;
    let mut unguided = common::basic_request();
    unguided.guidance_scale = 1.0;
    unguided.seed = 23;
    let requests: Vec<GenerateRequest> = plain
        .into_iter()
        .chain([weighted, long, unguided])
        .collect();
    let outputs = batch(&requests);
    for (i, (request, batched)) in requests.iter().zip(&outputs).enumerate() {
        assert_same(batched, &solo(request), &format!("run {i}"));
    }
    // Encoded together: the shared runs' time is every such run's text encoding time.
    let shared = outputs[0].timings.text_encoding;
    for i in [1, 2, 5] {
        assert_eq!(
            outputs[i].timings.text_encoding, shared,
            "run {i} shares the encoding"
        );
    }
    // Weighting changes these texts (markers; more than 75 tokens): encoded alone.
    for i in [3, 4] {
        assert_ne!(
            outputs[i].timings.text_encoding, shared,
            "run {i} is encoded alone"
        );
    }
}
