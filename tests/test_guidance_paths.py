"""The guided step's cost options on tiny random parts (no Ray): the criterion gradient in
micro-batches, the guidance decoders (full VAE, tiny AutoencoderTiny, latent resized to the
classifier's size), gradient checkpointing in the decoder and a compiled decode."""

from __future__ import annotations

import pytest
import torch
from test_sampler import pixel_parts
from test_unclip import GROUPS, LABELS, SEEDS, make_generator

from ray_lt.config import config_from_dict
from ray_lt.errors import ConfigError
from ray_lt.generate.base import slice_condition
from ray_lt.generate.criteria import CriterionScorer
from ray_lt.generate.pretrained import load_tiny_decoder
from ray_lt.generate.sampler import Guidance, guided_sample
from ray_lt.testing import tiny_autoencoder, tiny_unclip_components
from ray_lt.train.models import build_model


def _unclip_scorer(generator):
    torch.manual_seed(1)
    classifier = build_model("small_cnn", num_classes=2, in_channels=3, width=8).eval()
    with torch.no_grad():
        classifier.head.weight.mul_(40)
    return CriterionScorer(classifier, ["entropy"])


def _run(generator, scorer, labels, groups, seeds, **guidance):
    n = len(seeds)
    return guided_sample(generator, scorer, labels, groups, torch.arange(n) % 2 * 0,
                         list(seeds), num_steps=6, cfg_scale=2.0,
                         guidance=Guidance(scale=0.2, every=2, **guidance))


@pytest.fixture
def one_thread():
    """Kernels split over threads round differently per batch size on some processors (AMD
    EPYC, 2 threads: 0.05 apart after six guided steps through the UNet); one thread keeps
    the comparison to the arithmetic of the micro-batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("through_unet", [False, True])
def test_micro_batches_give_the_whole_batch_gradient(through_unet, one_thread):
    generator, scorer = pixel_parts()
    labels, groups, seeds = torch.arange(8) % 10, torch.full((8,), -1), list(range(8))
    whole = _run(generator, scorer, labels, groups, seeds, through_unet=through_unet)
    parts = _run(generator, scorer, labels, groups, seeds, through_unet=through_unet,
                 micro_batch=3)
    torch.testing.assert_close(parts.latents, whole.latents, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(parts.criterion_before, whole.criterion_before)
    torch.testing.assert_close(parts.guidance_norm, whole.guidance_norm, atol=1e-5, rtol=1e-4)
    assert (whole.guidance_norm > 0).all()


def test_micro_batches_through_the_unclip_unet_cut_the_conditioning():
    generator = make_generator()
    scorer = _unclip_scorer(generator)
    cond = generator.condition(LABELS, GROUPS, SEEDS)
    part = slice_condition(cond, slice(1, 3))
    assert part.labels.tolist() == LABELS[1:3].tolist()
    assert part.inputs["prompts"] == cond.inputs["prompts"][1:3]
    assert part.inputs["image_embeds"].shape[0] == 2
    whole = _run(generator, scorer, LABELS, GROUPS, SEEDS, through_unet=True)
    parts = _run(generator, scorer, LABELS, GROUPS, SEEDS, through_unet=True, micro_batch=1)
    # Batch-size-dependent float kernels: equal up to rounding, far below a wrong slice.
    torch.testing.assert_close(parts.latents, whole.latents, atol=1e-4, rtol=1e-3)
    assert (parts.latents - whole.latents).abs().max() < 1e-3 * whole.latents.abs().max()


def _decoder_inputs(vae_decoder):
    """Spatial sizes of what reaches ``vae_decoder`` (a forward pre-hook records them)."""
    seen = []
    vae_decoder.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    return seen


def test_latent_resize_decodes_straight_to_the_classifier_size():
    generator = make_generator(guidance_decoder="latent_resize")
    assert generator.latent_shape()[1:] == (16, 16) and generator.image_size == 24
    seen = _decoder_inputs(generator.vae.decoder)
    z = torch.randn(2, *generator.latent_shape(), requires_grad=True)
    x = generator.decode(z)
    assert seen == [(12, 12)]  # 24 px / the VAE's factor 2
    assert x.shape == (2, 3, 24, 24) and 0 <= x.min() and x.max() <= 1
    (grad,) = torch.autograd.grad(x.square().sum(), z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    generator.decode_output(z.detach())
    assert seen[-1] == (16, 16)  # the saved image: the full latent through the full VAE


def test_tiny_decoder_round_trip_and_the_final_image_uses_the_full_vae(tmp_path):
    tiny_autoencoder().save_pretrained(tmp_path / "taesd")
    tiny = load_tiny_decoder(tmp_path / "taesd")
    generator = make_generator(guidance_decoder="tiny", tiny_decoder=tiny)
    full_vae = _decoder_inputs(generator.vae.decoder)
    z = torch.randn(3, *generator.latent_shape(), requires_grad=True)
    x = generator.decode(z)
    assert x.shape == (3, 3, 24, 24) and 0 <= x.min() and x.max() <= 1
    (grad,) = torch.autograd.grad(x.square().sum(), z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert full_vae == []
    assert generator.decode_output(z.detach()).shape == (3, 3, 24, 24) and full_vae == [(16, 16)]
    with pytest.raises(ConfigError, match="synthesis.tiny_decoder: .*config.json"):
        load_tiny_decoder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="synthesis.tiny_decoder"):
        make_generator(guidance_decoder="tiny")
    with pytest.raises(ConfigError, match="synthesis.guidance_decoder: 'taesd'"):
        make_generator(guidance_decoder="taesd")


@pytest.mark.parametrize("decoder", ["vae", "tiny"])
def test_decoder_checkpointing_gives_the_same_gradient(decoder):
    tiny = tiny_autoencoder()
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointing in (False, True):
        generator = make_generator(tiny_unclip_components(), guidance_decoder=decoder,
                                   tiny_decoder=tiny, decoder_checkpointing=checkpointing)
        z_in = z.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(generator.decode(z_in).square().sum(), z_in)[0])
    module = tiny.decoder if decoder == "tiny" else generator.vae.decoder
    assert module.gradient_checkpointing
    torch.testing.assert_close(grads[1], grads[0])


def test_compiled_unet_and_decode_match_eager():
    eager = make_generator()
    compiled = make_generator()
    compiled.compile(backend="aot_eager")
    assert type(compiled.unet).__name__ == "OptimizedModule"
    cond = eager.condition(LABELS, GROUPS, SEEDS)
    z = torch.randn(4, *eager.latent_shape(), generator=torch.Generator().manual_seed(5))
    t = eager.scheduler.timesteps[0] if len(eager.scheduler.timesteps) else torch.tensor(500)
    with torch.no_grad():
        torch.testing.assert_close(compiled.predict_noise(z, t, cond, 2.0),
                                   eager.predict_noise(z, t, cond, 2.0), atol=1e-5, rtol=1e-4)
    grads = []
    for generator in (eager, compiled):
        z_in = z.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(generator.decode(z_in).square().sum(), z_in)[0])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def _raw(**synthesis):
    return {"dataset": {"kind": "digits_lt"}, "synthesis": synthesis}


def test_config_refuses_decoders_that_cannot_apply():
    with pytest.raises(ConfigError, match="tiny_decoder: guidance_decoder 'tiny' needs"):
        config_from_dict(_raw(guidance_decoder="tiny"))
    with pytest.raises(ConfigError, match="synthesis.guidance_decoder: 'latent_resize' decodes "
                                         "a VAE latent, and generator.kind 'pixel' has none"):
        config_from_dict(_raw(guidance_decoder="latent_resize"))
    with pytest.raises(ConfigError, match="guidance_micro_batch"):
        config_from_dict(_raw(guidance_micro_batch=0))
    cfg = config_from_dict({**_raw(guidance_decoder="latent_resize", guidance_micro_batch=4),
                            "generator": {"kind": "unclip", "pretrained": "/x"},
                            "dataset": {"kind": "digits_lt", "channels": 3}})
    assert cfg.synthesis.guidance_micro_batch == 4


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operations that read a tensor's value on the host (on a GPU, each one waits
    for the device), and whether the step loop had started (the first noise prediction)."""

    READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select"}

    def __init__(self):
        super().__init__()
        self.in_loop = False
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_loop and func.__name__.split(".")[0] in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("micro_batch", [None, 2])
def test_the_step_loop_reads_no_tensor_value_on_the_host(micro_batch):
    """Timesteps, abar_t and labels reach the loop as host numbers or device tensors made
    before it, so no step waits on the device (the GPU bench counts the same on CUDA)."""
    generator = make_generator()
    scorer = _unclip_scorer(generator)
    mode = _HostReads()
    predict = generator.predict_noise

    def marked(*args, **kwargs):
        mode.in_loop = True
        return predict(*args, **kwargs)

    generator.predict_noise = marked
    with mode:
        out = _run(generator, scorer, LABELS, GROUPS, SEEDS, micro_batch=micro_batch)
    assert mode.in_loop and (out.guidance_norm > 0).all()
    assert mode.reads == []
