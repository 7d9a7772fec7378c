//! The UNet's device-binding path (inputs and outputs bound once per run, as on CUDA), the
//! static-shape sessions used for CUDA graphs, and guidance with the Euler update on the device
//! (`cuda.device_step`) compute exactly what the plain path computes, for single runs and for
//! dynamic batches.
//! Run on the CPU provider through `EngineOptions::bind_io_on_cpu`, so no GPU is needed.
//! With `SDXL_TEST_DEVICE=cuda:N` the static-shape sessions capture CUDA graphs, and two
//! engines on two threads check that a capture on one does not break the other's runs.

mod common;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use sdxl_worker::engine::capture_gate;
use sdxl_worker::engine::cuda::CudaOptions;
use sdxl_worker::engine::{
    Device, Engine, EngineError, EngineOptions, GenerateOutput, GenerateRequest, SchedulerKind,
};

/// Guidance and the scheduler on the host, with the UNet's inputs bound or not.
fn engine(bind: bool, graph: bool, graph_shapes: usize) -> Engine {
    engine_with(CudaOptions {
        io_binding: bind,
        graph,
        graph_shapes,
        device_step: false,
        ..CudaOptions::default()
    })
}

fn engine_with(cuda: CudaOptions) -> Engine {
    let options = EngineOptions {
        device: common::test_device(),
        intra_threads: Some(1),
        bind_io_on_cpu: cuda.io_binding,
        cuda,
    };
    Engine::load(common::tiny_model_dir(), &options).expect("load the tiny pipeline")
}

/// Guidance and the Euler update on the device, on bound buffers; then the same on up to
/// `graph_shapes` static-shape sessions (CUDA graphs on a GPU).
fn device_step_engines(graph_shapes: usize) -> (Engine, Engine) {
    let on_device = CudaOptions {
        device_step: true,
        ..CudaOptions::default()
    };
    let graphs = CudaOptions {
        graph: graph_shapes > 0,
        graph_shapes,
        ..on_device
    };
    (engine_with(on_device), engine_with(graphs))
}

fn run(engine: &Engine, request: &GenerateRequest) -> GenerateOutput {
    engine
        .generate(request, &mut |_| ControlFlow::Continue(()))
        .expect("generate")
}

fn requests() -> Vec<GenerateRequest> {
    let base = common::basic_request();
    vec![
        base.clone(),
        // Another prompt and seed at the same shape: the bound conditioning must be replaced.
        GenerateRequest {
            prompt: "a watercolor of a lighthouse at dusk".into(),
            negative_prompt: None,
            seed: 11,
            scheduler: SchedulerKind::EulerA,
            ..base.clone()
        },
        // Another shape (two images, so four UNet rows, and a wider latent).
        GenerateRequest {
            width: 80,
            num_images: 2,
            seed: 3,
            ..base.clone()
        },
        // No guidance: half the rows.
        GenerateRequest {
            guidance_scale: 1.0,
            seed: 5,
            ..base
        },
    ]
}

/// `exact`: bit-for-bit (the same session, on the CPU). Otherwise within float rounding: a
/// static-shape session is optimized differently by ONNX Runtime (shape computations folded,
/// other kernels), and on a GPU separately built sessions may pick other cuDNN algorithms.
fn assert_same(expected: &GenerateOutput, actual: &GenerateOutput, exact: bool, what: &str) {
    assert_eq!(expected.latents.len(), actual.latents.len());
    assert_eq!(expected.images.len(), actual.images.len());
    if exact && common::test_device() == Device::Cpu {
        assert!(
            expected.latents == actual.latents,
            "{what}: final latents differ"
        );
        for (e, a) in expected.images.iter().zip(&actual.images) {
            assert!(e.rgb == a.rgb, "{what}: image {} differs", e.index);
        }
        return;
    }
    let worst = expected
        .latents
        .iter()
        .zip(&actual.latents)
        .map(|(e, a)| (e - a).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "{what}: final latents differ by {worst}");
    for (e, a) in expected.images.iter().zip(&actual.images) {
        let levels = e
            .rgb
            .iter()
            .zip(&a.rgb)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0);
        assert!(
            levels <= 1,
            "{what}: image {} differs by {levels} levels",
            e.index
        );
    }
}

#[test]
fn bound_buffers_and_static_shape_sessions_compute_what_the_plain_path_computes() {
    let plain = engine(false, false, 0);
    let bound = engine(true, false, 0);
    // One static shape only: the first shape gets a static session, later shapes fall back.
    let static_one = engine(true, true, 1);
    let static_many = engine(true, true, 4);
    for (i, request) in requests().iter().enumerate() {
        let expected = run(&plain, request);
        assert_same(
            &expected,
            &run(&bound, request),
            true,
            &format!("bound, request {i}"),
        );
        assert_same(
            &expected,
            &run(&static_one, request),
            false,
            &format!("one static shape, request {i}"),
        );
        assert_same(
            &expected,
            &run(&static_many, request),
            false,
            &format!("static shapes, request {i}"),
        );
    }
    // Back to the first shape after others: its buffers are reused with new conditioning.
    let again = requests().remove(1);
    assert_same(
        &run(&plain, &again),
        &run(&static_many, &again),
        false,
        "static shape reused",
    );
}

/// Two engines driven from two threads, as a worker with a GPU consumer per device drives them:
/// one builds static-shape sessions (capturing CUDA graphs on a GPU) at each new shape while
/// the other keeps running. Each unit of work holds the capture gate as the worker's engine
/// threads do. Without the gate, on CUDA, the running thread's synchronizations invalidate the
/// capture and the runs of both threads fail.
#[test]
fn a_capture_on_one_thread_does_not_break_runs_on_another() {
    let plain = engine(false, false, 0);
    let expected: Vec<GenerateOutput> = requests().iter().map(|r| run(&plain, r)).collect();
    let stop = AtomicBool::new(false);
    let (started, first_run) = mpsc::channel();
    std::thread::scope(|scope| {
        let other = scope.spawn(|| {
            let bound = engine(true, false, 0);
            let request = &requests()[0];
            let mut runs = 0;
            while runs < 2 || !stop.load(Ordering::Relaxed) {
                {
                    let _gpu = capture_gate::gpu_work();
                    let output = run(&bound, request);
                    assert_same(&expected[0], &output, false, "the other thread's run");
                }
                runs += 1;
                if runs == 1 {
                    started.send(()).expect("the test is waiting");
                }
            }
            runs
        });
        // Stops the other thread also when an assertion below fails.
        let _stop = StopOnDrop(&stop);
        let capturing = engine(true, true, 8);
        first_run
            .recv_timeout(Duration::from_secs(300))
            .expect("the other thread's first run");
        // Requests 0, 2 and 3 each need a new static shape; request 1 reuses the first.
        let new_shape = [true, false, true, true];
        for (i, request) in requests().iter().enumerate() {
            let _gpu = capture_gate::gpu_work();
            let output = run(&capturing, request);
            assert_same(
                &expected[i],
                &output,
                false,
                &format!("capturing, request {i}"),
            );
            assert_eq!(
                capture_gate::holds_exclusive(),
                new_shape[i],
                "request {i}: the gate is held exclusively exactly when a session was built"
            );
        }
        stop.store(true, Ordering::Relaxed);
        let runs = other.join().expect("the other thread");
        assert!(runs >= 2, "the other thread ran {runs} times");
    });
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn guidance_and_euler_steps_on_the_device_compute_what_the_host_computes() {
    let plain = engine(false, false, 0);
    let (on_device, graphs) = device_step_engines(4);
    let euler = |request: GenerateRequest| GenerateRequest {
        scheduler: SchedulerKind::Euler,
        ..request
    };
    // Euler with and without guidance, one and two images, two shapes; then requests that
    // step on the host even with the option on (Euler ancestral, guidance rescale).
    let mut cases: Vec<GenerateRequest> = requests().into_iter().map(euler).collect();
    cases.push(GenerateRequest {
        scheduler: SchedulerKind::EulerA,
        ..common::basic_request()
    });
    cases.push(GenerateRequest {
        guidance_rescale: 0.7,
        ..euler(common::basic_request())
    });
    for (i, request) in cases.iter().enumerate() {
        let expected = run(&plain, request);
        let got = run(&on_device, request);
        assert_same(&expected, &got, true, &format!("device step, request {i}"));
        assert_eq!(got.timings.per_step.len(), request.steps as usize);
        // The first four are Euler without guidance rescale; the others step on the host.
        let on_device = if i < 4 { request.steps as usize } else { 0 };
        assert_eq!(got.timings.device_steps, on_device, "request {i}");
        assert_same(
            &expected,
            &run(&graphs, request),
            false,
            &format!("device step with static shapes, request {i}"),
        );
    }
}

#[test]
fn batches_on_bound_buffers_compute_what_the_plain_path_computes() {
    let plain = engine(false, false, 0);
    let bound = engine(true, false, 0);
    let static_shapes = engine(true, true, 2);
    let base = common::basic_request();
    // Two jobs that may share a batch: other prompts, seeds, image counts and guidance.
    let jobs = [
        base.clone(),
        GenerateRequest {
            prompt: "a watercolor of a lighthouse at dusk".into(),
            negative_prompt: None,
            seed: 11,
            num_images: 2,
            guidance_scale: 7.5,
            ..base
        },
    ];
    let refs: Vec<&GenerateRequest> = jobs.iter().collect();
    let batch = |engine: &Engine| -> Vec<GenerateOutput> {
        engine
            .generate_batch(&refs, &mut |_, _| ControlFlow::Continue(()))
            .into_iter()
            .map(|r| r.expect("batched run"))
            .collect()
    };
    let expected = batch(&plain);
    assert!(expected.iter().all(|o| o.batch_size == 2));
    // Twice each: the second batch reuses the first one's buffers (and static session).
    for round in 0..2 {
        for (i, (e, got)) in expected.iter().zip(batch(&bound)).enumerate() {
            assert_same(e, &got, true, &format!("bound batch {round}, job {i}"));
        }
        for (i, (e, got)) in expected.iter().zip(batch(&static_shapes)).enumerate() {
            assert_same(
                e,
                &got,
                false,
                &format!("static-shape batch {round}, job {i}"),
            );
        }
    }
}

/// A dynamic batch with every run on the Euler update.
fn euler_batch(engine: &Engine, jobs: &[GenerateRequest]) -> Vec<GenerateOutput> {
    let refs: Vec<&GenerateRequest> = jobs.iter().collect();
    engine
        .generate_batch(&refs, &mut |_, _| ControlFlow::Continue(()))
        .into_iter()
        .map(|r| r.expect("batched run"))
        .collect()
}

#[test]
fn batches_step_on_the_device_as_their_runs_step_alone_on_the_host() {
    let plain = engine(false, false, 0);
    let (on_device, graphs) = device_step_engines(2);
    let base = common::basic_request();
    assert_eq!(base.scheduler, SchedulerKind::Euler);
    // Each run with its own prompt, seed, image count and guidance scale: the step graph must
    // pick each image's rows and apply its own run's scale.
    let jobs = [
        base.clone(),
        GenerateRequest {
            prompt: "a watercolor of a lighthouse at dusk".into(),
            negative_prompt: None,
            seed: 11,
            num_images: 2,
            guidance_scale: 7.5,
            ..base.clone()
        },
        GenerateRequest {
            prompt: "a bowl of ramen".into(),
            seed: 23,
            guidance_scale: 3.0,
            ..base.clone()
        },
    ];
    // Without guidance the rows are the images.
    let unguided = [
        GenerateRequest {
            guidance_scale: 1.0,
            seed: 5,
            ..base.clone()
        },
        GenerateRequest {
            guidance_scale: 1.0,
            num_images: 2,
            seed: 6,
            ..base.clone()
        },
    ];
    for (set, jobs) in [("guided", &jobs[..]), ("unguided", &unguided[..])] {
        for (i, (job, got)) in jobs.iter().zip(euler_batch(&on_device, jobs)).enumerate() {
            let what = format!("{set} batch on the device, job {i}");
            assert_eq!(got.batch_size, jobs.len(), "{what}");
            assert_eq!(got.timings.device_steps, job.steps as usize, "{what}");
            assert_same(&run(&plain, job), &got, true, &what);
        }
    }
    // Twice: the second batch replays the first one's static session.
    for round in 0..2 {
        for (i, (job, got)) in jobs.iter().zip(euler_batch(&graphs, &jobs)).enumerate() {
            let what = format!("static-shape batch {round} on the device, job {i}");
            assert_eq!(got.timings.device_steps, job.steps as usize, "{what}");
            assert_same(&run(&plain, job), &got, false, &what);
        }
    }
    // One run with guidance rescale keeps the whole batch on the host.
    let rescaled = [
        base.clone(),
        GenerateRequest {
            guidance_rescale: 0.7,
            seed: 5,
            ..base
        },
    ];
    for (i, (job, got)) in rescaled
        .iter()
        .zip(euler_batch(&on_device, &rescaled))
        .enumerate()
    {
        assert_eq!(got.batch_size, 2);
        assert_eq!(got.timings.device_steps, 0, "rescaled batch, job {i}");
        assert_same(
            &run(&plain, job),
            &got,
            true,
            &format!("rescaled batch, job {i}"),
        );
    }
}

#[test]
fn runs_that_leave_a_batch_stepped_on_the_device_leave_the_others_exact() {
    let plain = engine(false, false, 0);
    let (on_device, _) = device_step_engines(0);
    let base = common::basic_request();
    let jobs = [
        base.clone(),
        // Cancelled after its second step: the others go on as a batch of two.
        GenerateRequest {
            prompt: "a watercolor of a lighthouse at dusk".into(),
            seed: 11,
            ..base.clone()
        },
        // A guidance scale that overflows the latents: this run fails, the others do not.
        GenerateRequest {
            seed: 12,
            guidance_scale: 3.0e38,
            ..base.clone()
        },
        GenerateRequest {
            prompt: "a bowl of ramen".into(),
            seed: 23,
            num_images: 2,
            ..base
        },
    ];
    let refs: Vec<&GenerateRequest> = jobs.iter().collect();
    let mut seen = vec![0u32; jobs.len()];
    let results = on_device.generate_batch(&refs, &mut |index, progress| {
        seen[index] = progress.step;
        if index == 1 && progress.step == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert!(
        matches!(results[1], Err(EngineError::Cancelled)),
        "{:?}",
        results[1].as_ref().err()
    );
    assert!(
        matches!(results[2], Err(EngineError::NonFinite { .. })),
        "{:?}",
        results[2].as_ref().err()
    );
    // The overflow shows when the latents come back from the device, here as run 1 leaves.
    assert_eq!(seen, [4, 2, 2, 4]);
    for i in [0, 3] {
        let got = results[i].as_ref().expect("a run that stayed");
        assert_eq!(got.timings.device_steps, jobs[i].steps as usize);
        assert_same(&run(&plain, &jobs[i]), got, true, &format!("job {i}"));
    }
}
