//! The schedulers against diffusers 0.42.1 (goldens from `onnx/golden_schedulers.py`): timesteps,
//! sigmas and `init_noise_sigma` for every kind, spacing and step count 1–60; whole denoising
//! loops with a toy model; class defaults; configuration errors.

use std::path::PathBuf;

use sdxl_worker::engine::noise::BatchNoise;
use sdxl_worker::engine::scheduler::{
    self, Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, SchedulerOverrides,
};
use serde_json::{json, Value};

fn golden(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden/schedulers")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).expect("golden JSON")
}

/// The case's kind and configuration: the base config patched with `config`, then `overrides`
/// applied through [`SchedulerConfig::with_overrides`].
fn case_setup(base: &Value, case: &Value) -> (SchedulerKind, SchedulerConfig, u32) {
    let kind = SchedulerKind::parse(case["kind"].as_str().unwrap()).expect("known kind");
    let mut json = base.clone();
    for (k, v) in case["config"].as_object().unwrap() {
        json[k] = v.clone();
    }
    let overrides: SchedulerOverrides =
        serde_json::from_value(case["overrides"].clone()).expect("overrides");
    let config = SchedulerConfig::from_json(&json)
        .expect("config parses")
        .with_overrides(&overrides);
    (kind, config, case["steps"].as_u64().unwrap() as u32)
}

fn close(a: f64, b: f64) -> bool {
    let d = (a - b).abs();
    d <= 1e-6 || d <= 1e-6 * a.abs().max(b.abs())
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn describe(case: &Value) -> String {
    format!(
        "{} {} {} steps={}",
        case["kind"], case["overrides"], case["config"], case["steps"]
    )
}

fn compare_list(what: &str, got: &[f64], want: &[f64]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!(
            "{what}: {} values, diffusers {}",
            got.len(),
            want.len()
        ));
    }
    let bad = got.iter().zip(want).position(|(&g, &w)| !close(g, w))?;
    Some(format!(
        "{what}[{bad}]: {} vs diffusers {}",
        got[bad], want[bad]
    ))
}

/// The cases of the compact timesteps golden (`timesteps.json` indexes the float32 lists in
/// `timesteps.f32`; see `onnx/golden_schedulers.py`), each as one JSON object with `kind`,
/// `overrides`, `config`, `steps` and `timesteps`, `sigmas`, `init_noise_sigma` or `error`.
fn timestep_cases(g: &Value) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden/schedulers")
        .join(g["values"].as_str().expect("values file"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let arrays = g["arrays"].as_array().unwrap();
    let list = |id: &Value| -> Value {
        let entry = &arrays[id.as_u64().unwrap() as usize];
        let start = entry[0].as_u64().unwrap() as usize;
        let len = entry[1].as_u64().unwrap() as usize;
        json!(values[start..start + len]
            .iter()
            .map(|&v| f64::from(v))
            .collect::<Vec<f64>>())
    };
    let mut cases = Vec::new();
    for group in g["groups"].as_array().unwrap() {
        for row in group["cases"].as_array().unwrap() {
            let mut case = json!({
                "kind": group["kind"],
                "overrides": group["overrides"],
                "config": group["config"],
                "steps": row[0],
            });
            match row.as_array().unwrap().as_slice() {
                [_, error] => case["error"] = error.clone(),
                [_, timesteps, sigmas, init] => {
                    case["timesteps"] = list(timesteps);
                    case["sigmas"] = list(sigmas);
                    case["init_noise_sigma"] = init.clone();
                }
                other => panic!("malformed golden case {other:?}"),
            }
            cases.push(case);
        }
    }
    cases
}

#[test]
fn timesteps_and_sigmas_match_diffusers() {
    let g = golden("timesteps.json");
    let base = &g["base_config"];
    let cases = timestep_cases(&g);
    assert!(
        cases.len() > 1800,
        "golden has every kind x spacing x 1..=60"
    );
    let mut failures = Vec::new();
    for case in &cases {
        let (kind, config, steps) = case_setup(base, case);
        let built = scheduler::build(kind, &config, steps);
        if let Some(err) = case.get("error") {
            if built.is_ok() {
                failures.push(format!(
                    "{}: diffusers raised {err}, built fine",
                    describe(case)
                ));
            }
            continue;
        }
        let s = match built {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{}: {e}", describe(case)));
                continue;
            }
        };
        let problems = [
            compare_list("timesteps", s.timesteps(), &floats(&case["timesteps"])),
            compare_list("sigmas", s.sigmas(), &floats(&case["sigmas"])),
            compare_list(
                "init_noise_sigma",
                &[s.init_noise_sigma()],
                &[case["init_noise_sigma"].as_f64().unwrap()],
            ),
        ];
        for p in problems.into_iter().flatten() {
            failures.push(format!("{}: {p}", describe(case)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from diffusers, first ones:\n{}",
        failures.len(),
        cases.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}

/// The toy model of the golden: `0.8·tanh(0.5·x) + 0.05·cos(t/100)` in float32.
fn toy_model(x: &[f32], t: f64) -> Vec<f32> {
    let bias = 0.05 * (t as f32 / 100.0).cos();
    x.iter().map(|&v| 0.8 * (0.5 * v).tanh() + bias).collect()
}

/// The denoising loop exactly as the engine runs it.
fn run_loop(s: &mut dyn Scheduler, seeds: &[u64], len: usize) -> Vec<f32> {
    let mut noise = BatchNoise::from_seeds(seeds);
    let mut latents = noise.sample(len);
    let init = s.init_noise_sigma() as f32;
    latents.iter_mut().for_each(|v| *v *= init);
    for i in 0..s.timesteps().len() {
        let mut x = latents.clone();
        s.scale_model_input(&mut x, i);
        let out = toy_model(&x, s.timesteps()[i]);
        s.step(&out, i, &mut latents, &mut noise);
    }
    latents
}

#[test]
fn denoising_loops_match_diffusers() {
    let g = golden("trajectories.json");
    let base = &g["base_config"];
    let seeds: Vec<u64> = g["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let len: usize = g["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .product();
    let runs = g["runs"].as_array().unwrap();
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    for run in runs {
        let (kind, config, steps) = case_setup(base, run);
        assert_eq!(kind.diffusers_class(), run["class"].as_str().unwrap());
        let mut s = scheduler::build(kind, &config, steps)
            .unwrap_or_else(|e| panic!("{}: {e}", describe(run)));
        assert_eq!(
            s.timesteps().len() as u64,
            run["evaluations"].as_u64().unwrap(),
            "{}",
            describe(run)
        );
        let got = run_loop(s.as_mut(), &seeds, len);
        let want = floats(&run["final"]);
        let max_abs = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(
                0.0f64,
                |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
            );
        worst = worst.max(max_abs);
        if max_abs > 1e-4 {
            failures.push(format!("{}: max abs diff {max_abs:e}", describe(run)));
        }
    }
    eprintln!("{} loops, worst max abs difference {worst:e}", runs.len());
    assert!(
        failures.is_empty(),
        "{} of {} loops differ from diffusers by more than 1e-4 (worst {worst:e}):\n{}",
        failures.len(),
        runs.len(),
        failures.join("\n")
    );
}

/// SDXL base's scheduler config as the model ships it (EulerDiscreteScheduler's keys only).
fn euler_config() -> Value {
    golden("trajectories.json")["base_config"].clone()
}

#[test]
fn absent_keys_take_the_built_class_defaults() {
    let base = SchedulerConfig::from_json(&euler_config()).unwrap();
    // The Euler config has no clip_sample: DDIM's default (clip x0 to [-1, 1]) applies.
    let mut no_clip = euler_config();
    no_clip["clip_sample"] = json!(false);
    let mut clip = euler_config();
    clip["clip_sample"] = json!(true);
    let default = ddim_step(&euler_config(), 0);
    assert_eq!(default, ddim_step(&clip, 0));
    assert_ne!(default, ddim_step(&no_clip, 0));

    // Keys the config does carry are used by every class: leading spacing with offset 1.
    let ddim = scheduler::build(SchedulerKind::Ddim, &base, 10).unwrap();
    assert_eq!(ddim.timesteps()[0], 901.0);
    // Without timestep_spacing, each class falls back to its own default: DDIM leading,
    // Euler linspace.
    let mut bare = euler_config();
    bare.as_object_mut().unwrap().remove("timestep_spacing");
    let bare = SchedulerConfig::from_json(&bare).unwrap();
    let ddim = scheduler::build(SchedulerKind::Ddim, &bare, 10).unwrap();
    let euler = scheduler::build(SchedulerKind::Euler, &bare, 10).unwrap();
    assert_eq!(ddim.timesteps()[0], 901.0);
    assert_eq!(euler.timesteps()[0], 999.0);
}

/// One DDIM step from a fixed sample with a zero model output, for comparing configurations.
fn ddim_step(json: &Value, index: usize) -> Vec<f32> {
    let config = SchedulerConfig::from_json(json).unwrap();
    let mut s = scheduler::build(SchedulerKind::Ddim, &config, 10).unwrap();
    let mut sample = vec![30.0f32, -30.0, 0.1, 0.0];
    let out = vec![0.0f32; 4];
    s.step(&out, index, &mut sample, &mut BatchNoise::from_seeds(&[1]));
    sample
}

#[test]
fn keys_written_by_another_class_are_used() {
    // SDXL base as published: an Euler config that also carries DDIM/PNDM keys.
    let hub = json!({
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.19.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null,
        "use_karras_sigmas": false
    });
    let mut explicit = euler_config();
    explicit["clip_sample"] = json!(false);
    explicit["set_alpha_to_one"] = json!(false);
    // The last step lands on the final alpha, which set_alpha_to_one decides.
    assert_eq!(ddim_step(&hub, 9), ddim_step(&explicit, 9));
    assert_ne!(ddim_step(&hub, 9), ddim_step(&euler_config(), 9));

    // Keys diffusers recorded as "defaults of the writing class" fall back to the built class.
    let mut recorded = hub.clone();
    recorded["_use_default_values"] = json!(["clip_sample", "set_alpha_to_one"]);
    assert_eq!(ddim_step(&recorded, 9), ddim_step(&euler_config(), 9));
}

#[test]
fn overrides_replace_model_values() {
    let base = SchedulerConfig::from_json(&euler_config()).unwrap();
    let overrides = SchedulerOverrides {
        timestep_spacing: Some(scheduler::TimestepSpacing::Trailing),
        use_karras_sigmas: Some(true),
        ..Default::default()
    };
    let plain = scheduler::build(SchedulerKind::Euler, &base, 10).unwrap();
    let changed =
        scheduler::build(SchedulerKind::Euler, &base.with_overrides(&overrides), 10).unwrap();
    assert_eq!(plain.timesteps()[0], 901.0);
    // Karras sigmas over the trailing range start at the top of the schedule, fractionally.
    assert!((changed.timesteps()[0] - 999.0).abs() < 1e-3);
    assert!(changed.timesteps().iter().any(|t| t.fract() != 0.0));
}

#[test]
fn kinds_report_diffusers_class_and_a1111_name() {
    let expected = [
        ("euler", "EulerDiscreteScheduler", "Euler"),
        ("euler_a", "EulerAncestralDiscreteScheduler", "Euler a"),
        ("ddim", "DDIMScheduler", "DDIM"),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M"),
        (
            "dpmpp_2m_karras",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M Karras",
        ),
        (
            "dpmpp_2m_sde",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M SDE",
        ),
        (
            "dpmpp_2m_sde_karras",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M SDE Karras",
        ),
        ("unipc", "UniPCMultistepScheduler", "UniPC"),
        ("heun", "HeunDiscreteScheduler", "Heun"),
        ("lms", "LMSDiscreteScheduler", "LMS"),
    ];
    assert_eq!(expected.len(), SchedulerKind::ALL.len());
    for (id, class, a1111) in expected {
        let kind = SchedulerKind::parse(id).unwrap();
        assert_eq!(kind.id(), id);
        assert_eq!(kind.diffusers_class(), class);
        assert_eq!(kind.a1111_name(), a1111);
        assert_eq!(SchedulerKind::parse(a1111), Some(kind));
    }
}

fn parse_err(patch: Value) -> SchedulerError {
    let mut json = euler_config();
    for (k, v) in patch.as_object().unwrap() {
        json[k] = v.clone();
    }
    SchedulerConfig::from_json(&json).expect_err("config must be refused")
}

#[test]
fn bad_configuration_values_are_refused_with_codes() {
    let e = parse_err(json!({"beta_schedule": "cubic"}));
    assert_eq!(e.code(), "invalid_scheduler_config");
    assert!(e.to_string().contains("beta_schedule"), "{e}");
    assert_eq!(
        parse_err(json!({"num_train_timesteps": "many"})).code(),
        "invalid_scheduler_config"
    );
    assert_eq!(
        parse_err(json!({"steps_offset": -1})).code(),
        "invalid_scheduler_config"
    );
    assert_eq!(
        parse_err(json!({"timestep_spacing": "sideways"})).code(),
        "invalid_scheduler_config"
    );
    assert_eq!(
        parse_err(json!({"prediction_type": "sample"})).code(),
        "unsupported_scheduler_config"
    );
    assert_eq!(
        parse_err(json!({"trained_betas": [0.1, "x"]})).code(),
        "invalid_scheduler_config"
    );
    assert_eq!(
        SchedulerConfig::from_json(&json!([1, 2]))
            .unwrap_err()
            .code(),
        "invalid_scheduler_config"
    );

    let build_err = |kind: SchedulerKind, patch: Value, steps: u32| {
        let mut json = euler_config();
        for (k, v) in patch.as_object().unwrap() {
            json[k] = v.clone();
        }
        let config = SchedulerConfig::from_json(&json).unwrap();
        match scheduler::build(kind, &config, steps) {
            Ok(_) => panic!("{kind} with {patch} and {steps} steps must be refused"),
            Err(e) => e,
        }
    };
    let e = build_err(SchedulerKind::Ddim, json!({"thresholding": true}), 10);
    assert_eq!(e.code(), "unsupported_scheduler_config");
    let e = build_err(
        SchedulerKind::Dpmpp2m,
        json!({"algorithm_type": "dpmsolver"}),
        10,
    );
    assert_eq!(e.code(), "unsupported_scheduler_config");
    let e = build_err(SchedulerKind::Dpmpp2m, json!({"solver_order": 7}), 10);
    assert_eq!(e.code(), "invalid_scheduler_config");
    let e = build_err(SchedulerKind::Euler, json!({}), 0);
    assert_eq!(e.code(), "invalid_steps");
    let e = build_err(SchedulerKind::Lms, json!({}), 1001);
    assert_eq!(e.code(), "invalid_steps");
    for kind in SchedulerKind::ALL {
        let e = build_err(kind, json!({"num_train_timesteps": 0}), 10);
        assert_eq!(e.code(), "invalid_scheduler_config", "{kind}");
        let e = build_err(
            kind,
            json!({"beta_end": 1.5, "beta_schedule": "linear"}),
            10,
        );
        assert_eq!(e.code(), "invalid_scheduler_config", "{kind}");
    }
    let e = build_err(SchedulerKind::Euler, json!({"beta_schedule": "exp"}), 10);
    assert_eq!(e.code(), "unsupported_scheduler_config");
    // thresholding is not an Euler key: diffusers ignores it there, and so do we.
    let mut json = euler_config();
    json["thresholding"] = json!(true);
    let config = SchedulerConfig::from_json(&json).unwrap();
    assert!(scheduler::build(SchedulerKind::Euler, &config, 10).is_ok());
}
