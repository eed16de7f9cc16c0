"""Image processor and model: save/load round trips, batching of different sizes, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from hf_efficient.vision import (
    AttentionSamplingConfig,
    AttentionSamplingForImageClassification,
    AttentionSamplingImageProcessor,
)


def tiny_config(**kwargs) -> AttentionSamplingConfig:
    defaults = dict(
        num_channels=1, patch_size=8, num_patches=3, attention_channels=[4], feature_channels=[4, 8], num_labels=3
    )
    defaults.update(kwargs)
    return AttentionSamplingConfig(**defaults)


def test_processor_views_normalisation_and_padding():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    b = rng.integers(0, 256, (24, 64), dtype=np.uint8)
    proc = AttentionSamplingImageProcessor(low_res_scale=0.25, image_mean=0.5, image_std=0.25)
    enc = proc([a, b])
    assert enc["pixel_values"].shape == (2, 1, 40, 64)
    assert enc["low_res_pixel_values"].shape == (2, 1, 10, 16)
    assert enc["image_sizes"].tolist() == [[40, 48], [24, 64]]
    assert enc["low_res_sizes"].tolist() == [[10, 12], [6, 16]]
    expected_a = (torch.from_numpy(a).double() / 255 - 0.5) / 0.25
    # full resolution stays raw uint8; the normalisation comes as a per-channel affine map
    assert enc["pixel_values"].dtype == torch.uint8
    assert torch.equal(enc["pixel_values"][0, 0, :, :48], torch.from_numpy(a))
    normalised = enc["pixel_values"][0, 0, :, :48].double() * enc["pixel_scale"][0, 0] + enc["pixel_offset"][0, 0]
    torch.testing.assert_close(normalised, expected_a, rtol=1e-6, atol=1e-6)
    assert bool((enc["pixel_values"][0, 0, :, 48:] == 0).all())  # padding
    assert bool((enc["pixel_values"][1, 0, 24:] == 0).all())
    expected_a = expected_a.float()
    # the low-resolution view is the 4x4 block average of the normalised image
    torch.testing.assert_close(enc["low_res_pixel_values"][0, 0, :, :12], F.avg_pool2d(expected_a[None], 4)[0])


def test_processor_channels_last_rgb_and_fixed_low_res_size():
    image = np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    proc = AttentionSamplingImageProcessor(low_res_size={"height": 6, "width": 5}, image_mean=[0.1, 0.2, 0.3])
    enc = proc(image)
    assert enc["pixel_values"].shape == (1, 3, 30, 20)
    assert enc["low_res_pixel_values"].shape == (1, 3, 6, 5)
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - torch.tensor([0.1, 0.2, 0.3])[:, None, None])
    assert torch.equal(enc["pixel_values"][0], torch.from_numpy(image).permute(2, 0, 1))
    scale, offset = enc["pixel_scale"][0, :, None, None], enc["pixel_offset"][0, :, None, None]
    torch.testing.assert_close(enc["pixel_values"][0] * scale + offset, expected / 0.5)


def test_processor_save_load_round_trip(tmp_path):
    proc = AttentionSamplingImageProcessor(low_res_scale=0.125, image_mean=[0.3], image_std=[0.2], do_rescale=False)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    tiny_config().save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is AttentionSamplingImageProcessor
    assert loaded.low_res_scale == 0.125 and loaded.do_rescale is False
    image = np.random.default_rng(2).random((64, 40)).astype(np.float32)
    for key, value in proc(image).items():
        assert torch.equal(value, loaded(image)[key]), key


def test_processor_errors():
    with pytest.raises(ValueError, match="low_res_scale"):
        AttentionSamplingImageProcessor(low_res_scale=2.0)
    with pytest.raises(ValueError, match="low_res_size"):
        AttentionSamplingImageProcessor(low_res_size={"height": 0, "width": 4})
    with pytest.raises(TypeError, match="accepted"):
        AttentionSamplingImageProcessor()([object()])
    with pytest.raises(ValueError, match="not a file"):
        AttentionSamplingImageProcessor()(["not an image"])
    with pytest.raises(ValueError, match="channel count"):
        AttentionSamplingImageProcessor()([np.zeros((8, 8, 3)), np.zeros((8, 8))])


def test_model_save_load_round_trip_is_identical(tmp_path):
    torch.manual_seed(0)
    model = AttentionSamplingForImageClassification(tiny_config()).eval()
    proc = AttentionSamplingImageProcessor(low_res_scale=0.25)
    images = [np.random.default_rng(i).integers(0, 256, (32 + 8 * i, 40), dtype=np.uint8) for i in range(3)]
    enc = proc(images)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is AttentionSamplingForImageClassification
    assert type(AutoConfig.from_pretrained(tmp_path)) is AttentionSamplingConfig
    torch.manual_seed(5)
    a = model(**enc)
    torch.manual_seed(5)
    b = loaded(**enc)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.sampled_positions, b.sampled_positions)
    assert torch.equal(a.attention_map, b.attention_map)


def test_model_padding_gets_no_attention_and_no_patch_reads_it():
    torch.manual_seed(0)
    model = AttentionSamplingForImageClassification(tiny_config(num_patches=6))
    small = np.full((32, 32), 255, dtype=np.uint8)
    big = np.zeros((64, 80), dtype=np.uint8)
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25, do_normalize=False)([small, big])
    out = model(**enc, return_patches=True)
    att = out.attention_map[0]  # (16, 20) map, image 0 valid on its top-left 8x8 cells
    assert bool((att[8:] == 0).all()) and bool((att[:, 8:] == 0).all())
    torch.testing.assert_close(att.sum(), torch.tensor(1.0))
    # every sampled patch of image 0 sees only the all-ones image or zeros outside it
    assert bool(((out.patches[0] == 0) | (out.patches[0] == 1)).all())
    centres = out.patch_top_left[0] + 4
    assert bool((centres >= 0).all()) and bool((centres < 32).all())


def test_model_gradients_reach_both_networks_and_loss_has_regulariser():
    torch.manual_seed(0)
    config = tiny_config(entropy_regularizer=0.5)
    model = AttentionSamplingForImageClassification(config)
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(list(np.random.default_rng(0).random((2, 32, 32))))
    labels = torch.tensor([0, 2])
    torch.manual_seed(1)
    out = model(**enc, labels=labels)
    ce = F.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, ce + 0.5 * out.entropy_penalty)
    out.loss.backward()
    assert model.attention_network[0].weight.grad.abs().sum() > 0
    assert model.feature_network[0].weight.grad.abs().sum() > 0


def test_model_with_a_transformers_backbone_as_feature_network():
    from transformers import ResNetConfig

    backbone = ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    ).to_dict()
    model = AttentionSamplingForImageClassification(tiny_config(patch_size=16, feature_network_config=backbone))
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(list(np.random.default_rng(0).random((2, 32, 32))))
    out = model(**enc, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 3)
    out.loss.backward()
    assert model.attention_network[0].weight.grad.abs().sum() > 0


def test_clear_errors_for_small_images_and_bad_configs():
    model = AttentionSamplingForImageClassification(tiny_config(patch_size=16))
    enc = AttentionSamplingImageProcessor(low_res_scale=0.5)(np.zeros((12, 40), dtype=np.float32))
    with pytest.raises(ValueError, match="smaller than a patch"):
        model(**enc)
    with pytest.raises(ValueError, match="low_res_pixel_values is required"):
        model(pixel_values=enc["pixel_values"])
    bad = [
        dict(sampling="greedy"),
        dict(num_patches=0),
        dict(patch_size=[8, 8, 8]),
        dict(attention_smoothing=1.0),
        dict(feature_channels=[]),
        dict(feature_network_config={"hidden_size": 3}),
        dict(classifier_dropout=-0.1),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match="AttentionSamplingConfig"):
            tiny_config(**kwargs)


def test_zero_init_attention_starts_uniform_and_still_learns():
    torch.manual_seed(0)
    model = AttentionSamplingForImageClassification(tiny_config(zero_init_attention=True))
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(list(np.random.default_rng(0).random((2, 32, 32))))
    out = model(**enc, labels=torch.tensor([0, 1]))
    k = out.attention_map[0].numel()
    torch.testing.assert_close(out.attention_map, torch.full_like(out.attention_map, 1.0 / k))
    out.loss.backward()
    # the last attention layer gets a gradient at the uniform start, so the map can move
    assert model.attention_network[-1].weight.grad.abs().sum() > 0


def test_normalized_features_match_a_manual_forward():
    torch.manual_seed(0)
    model = AttentionSamplingForImageClassification(tiny_config(normalize_features=True)).eval()
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(list(np.random.default_rng(1).random((2, 32, 32))))
    torch.manual_seed(3)
    out = model(**enc, return_patches=True)
    b, n = out.patches.shape[:2]
    features = model.feature_network(out.patches.flatten(0, 1)).view(b, n, -1)
    unit = features / features.norm(dim=-1, keepdim=True)
    expected = model.classifier((out.sample_weights[..., None] * unit).sum(1))
    torch.testing.assert_close(out.logits, expected)


@pytest.mark.parametrize("multiscale", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_convolutions_give_the_default_layout_results(multiscale, training, monkeypatch):
    """On the CPU the package's own CNNs get their input channels-last (faster), except a network with batch norm
    in training mode (its batch statistics lose precision on that layout); the logits, loss and every gradient
    must be those of the default layout."""
    from hf_efficient.vision.attention_sampling import modeling_attention_sampling as modeling

    extra = dict(region_size=16, num_regions=2, region_downsample=2, num_patches=2) if multiscale else {}
    torch.manual_seed(0)
    model = AttentionSamplingForImageClassification(
        tiny_config(attention_channels=[4, 4], feature_channels=[4, 8], **extra)).train(training)
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(list(np.random.default_rng(0).random((3, 64, 64))))
    labels = torch.tensor([0, 2, 1])

    def run():
        model.zero_grad()
        torch.manual_seed(5)
        out = model(**enc, labels=labels)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    layouts = {}  # the layout the second convolution of each network gets (4 or more channels: telling)
    nets = {"attention": model.attention_network, "feature": model.feature_network,
            "region": model.region_attention_network}
    handles = []
    for name, net in nets.items():
        if net is not None:
            conv = [m for m in net if isinstance(m, torch.nn.Conv2d)][1]
            handles.append(conv.register_forward_pre_hook(
                lambda module, args, name=name: layouts.__setitem__(
                    name, args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())))
    fast, fast_grads = run()
    want = {name: not (name == "feature" and training) for name, net in nets.items() if net is not None}
    assert layouts == want
    monkeypatch.setattr(modeling, "run_cnn", lambda net, x: net(x))
    layouts.clear()
    plain, plain_grads = run()
    assert not any(layouts.values())
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(fast.logits, plain.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(fast.patch_top_left, plain.patch_top_left)
    assert fast_grads.keys() == plain_grads.keys() and len(fast_grads) == len(list(model.parameters()))
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_run_cnn_keeps_float32_precision_against_float64(training):
    """The layout run_cnn picks must be as precise as the default one: a feature network over sparse patches
    (mostly zero, as megaNIST's) against its float64 copy, in training mode (batch statistics) and in eval mode."""
    from hf_efficient.vision.attention_sampling import build_feature_cnn, run_cnn

    torch.manual_seed(0)
    net = build_feature_cnn(1, [16, 32, 32]).train(training)
    if not training:
        for module in net:
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(0, 0.1)
                module.running_var.uniform_(0.5, 2)
    net64 = build_feature_cnn(1, [16, 32, 32])
    net64.load_state_dict(net.state_dict())
    net64 = net64.double().train(training)
    patches = torch.rand(128, 1, 50, 50) * (torch.rand(128, 1, 50, 50) < 0.1)
    want = net64(patches.double())
    got = run_cnn(net, patches).double()
    plain = net(patches).double()
    scale = want.abs().max()
    assert (got - want).abs().max() / scale <= 4 * max((plain - want).abs().max() / scale, 1e-7)


def test_a_replaced_feature_network_gets_its_input_in_the_default_layout():
    """A network the user put in (which may view its activations) is not handed a channels-last tensor."""

    class Viewing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.proj = torch.nn.Linear(4 * 8 * 8, 8)

        def forward(self, x):
            h = self.conv(x)
            return self.proj(h.view(h.shape[0], -1))  # fails on a channels-last activation

    model = AttentionSamplingForImageClassification(tiny_config(feature_channels=[4, 8]))
    model.feature_network = Viewing()
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(list(np.random.default_rng(0).random((2, 32, 32))))
    out = model(**enc, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert model.feature_network.conv.weight.grad.abs().sum() > 0
