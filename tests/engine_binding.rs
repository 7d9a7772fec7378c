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
    Device, Engine, EngineOptions, GenerateOutput, GenerateRequest, SchedulerKind,
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
    let on_device = engine_with(CudaOptions {
        device_step: true,
        ..CudaOptions::default()
    });
    let graphs = engine_with(CudaOptions {
        device_step: true,
        graph: true,
        graph_shapes: 4,
        ..CudaOptions::default()
    });
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
