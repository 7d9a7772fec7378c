"""Check an fp32 ONNX export against the PyTorch pipeline it came from.

Every component runs in ONNX Runtime (CPU) and in PyTorch on random inputs at two batch sizes
and two spatial sizes (one non-square), so that a dimension frozen at export time shows up.
"""

import os

import numpy as np
import onnxruntime as ort
import torch

from export_sdxl import time_ids_width, vae_scale_factor


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _compare(name, got, want, tol):
    want = want.detach().float().numpy()
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {got.shape} != {want.shape}")
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    if not err <= tol:
        raise AssertionError(f"{name}: max error {err:.3g} (relative to {scale:.3g}) > {tol}")
    return err


def verify_export(pipe, out_dir, tol=1e-4, log=print):
    """Raise AssertionError when an exported component disagrees with PyTorch."""
    gen = torch.Generator().manual_seed(0)
    worst = {}

    encoders = [("text_encoder", pipe.text_encoder, False), ("text_encoder_2", pipe.text_encoder_2, True)]
    for name, model, proj in [e for e in encoders if e[1] is not None]:
        sess = _session(os.path.join(out_dir, name, "model.onnx"))
        for batch, seq in ((1, 77), (3, 20)):
            ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
            ids[:, 0] = 49406
            ids[:, seq // 2] = 49407
            with torch.no_grad():
                ref = model(ids, output_hidden_states=True)
            outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input_ids": ids.numpy()})))
            pairs = [("last_hidden_state", ref.last_hidden_state)]
            pairs.append(("text_embeds", ref.text_embeds) if proj else ("pooler_output", ref.pooler_output))
            pairs += [(f"hidden_states.{i}", h) for i, h in enumerate(ref.hidden_states)]
            if len(outs) != len(pairs):
                raise AssertionError(f"{name}: {len(outs)} outputs, expected {len(pairs)}")
            for key, want in pairs:
                err = _compare(f"{name}.{key}", outs[key], want, tol)
                worst[name] = max(worst.get(name, 0.0), err)

    unet = pipe.unet
    refiner = time_ids_width(unet, pipe.text_encoder_2.config.projection_dim) == 5
    sess = _session(os.path.join(out_dir, "unet", "model.onnx"))
    for batch, h, w, t in ((2, 16, 16, 999.0), (3, 24, 16, 1.5)):
        inputs = {
            "sample": torch.randn(batch, unet.config.in_channels, h, w, generator=gen),
            "timestep": torch.tensor(t, dtype=torch.float32),
            "encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen),
            "text_embeds": torch.randn(batch, pipe.text_encoder_2.config.projection_dim, generator=gen),
            "time_ids": torch.tensor(
                [[h * 8.0, w * 8.0, 0.0, 0.0, 6.0] if refiner else [h * 8.0, w * 8.0, 0.0, 0.0, h * 8.0, w * 8.0]]
                * batch
            ),
        }
        with torch.no_grad():
            ref = unet(
                inputs["sample"],
                inputs["timestep"],
                inputs["encoder_hidden_states"],
                added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
            ).sample
        (got,) = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
        worst["unet"] = max(worst.get("unet", 0.0), _compare("unet.out_sample", got, ref, tol))

    vae = pipe.vae
    factor = vae_scale_factor(vae)
    dec = _session(os.path.join(out_dir, "vae_decoder", "model.onnx"))
    enc = _session(os.path.join(out_dir, "vae_encoder", "model.onnx"))
    for batch, h, w in ((1, 16, 16), (2, 24, 16)):
        latent = torch.randn(batch, vae.config.latent_channels, h, w, generator=gen)
        image = torch.rand(batch, 3, h * factor, w * factor, generator=gen) * 2 - 1
        with torch.no_grad():
            ref_dec = vae.decode(latent).sample
            ref_enc = vae.encode(image).latent_dist.parameters
        (got,) = dec.run(None, {"latent_sample": latent.numpy()})
        worst["vae_decoder"] = max(worst.get("vae_decoder", 0.0), _compare("vae_decoder", got, ref_dec, tol))
        (got,) = enc.run(None, {"sample": image.numpy()})
        worst["vae_encoder"] = max(worst.get("vae_encoder", 0.0), _compare("vae_encoder", got, ref_enc, tol))

    for name, err in sorted(worst.items()):
        log(f"verified {name}: max relative error {err:.2e}")
    return worst
