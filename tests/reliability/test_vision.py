"""Misuse of the attention-sampling image processor, model and megaNIST: a clear error or the right answer.

Image files are real PNGs written with PIL; the references convert the pixel data independently
(palette lookup by hand, 16-bit scaling in float64, alpha blending by formula) and compare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hf_efficient.vision import (
    AttentionSamplingConfig,
    AttentionSamplingForImageClassification,
    AttentionSamplingImageProcessor,
    make_megamnist,
)


def tiny_model(channels: int = 1, **kwargs) -> AttentionSamplingForImageClassification:
    defaults = dict(num_channels=channels, patch_size=4, num_patches=3, attention_channels=[4], feature_channels=[4],
                    num_labels=3)
    defaults.update(kwargs)
    torch.manual_seed(0)
    return AttentionSamplingForImageClassification(AttentionSamplingConfig(**defaults)).eval()


def normalised(enc) -> torch.Tensor:
    """The processor's full-resolution output after its own affine map, in float64."""
    scale = enc["pixel_scale"].double()[:, :, None, None]
    offset = enc["pixel_offset"].double()[:, :, None, None]
    return enc["pixel_values"].double() * scale + offset


def saved(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


# --- image modes, read from real PNG files ------------------------------------------------------

def test_16_bit_png_keeps_16_bits_and_maps_full_scale_to_one(tmp_path):
    data = np.random.default_rng(0).integers(0, 65536, (20, 24)).astype(np.uint16)
    data[0, 0], data[0, 1] = 0, 65535
    path = saved(Image.fromarray(data), tmp_path / "deep.png")
    proc = AttentionSamplingImageProcessor(low_res_scale=0.5)
    for source in (path, str(path), Image.open(path)):
        enc = proc(source)
        assert enc["pixel_values"].dtype == torch.uint16
        assert torch.equal(enc["pixel_values"][0, 0].to(torch.int64), torch.from_numpy(data.astype(np.int64)))
        expected = (data.astype(np.float64) / 65535 - 0.5) / 0.5  # in [-1, 1]
        torch.testing.assert_close(normalised(enc)[0, 0], torch.from_numpy(expected), rtol=0, atol=1e-6)
        low = F.avg_pool2d(torch.from_numpy(expected)[None], 2)[0].float()
        torch.testing.assert_close(enc["low_res_pixel_values"][0, 0], low, rtol=0, atol=1e-5)


def test_32_bit_integer_image_outside_16_bits_is_refused():
    image = Image.fromarray(np.array([[0, 70000], [5, 6]], dtype=np.int32), mode="I")
    with pytest.raises(ValueError, match=r"mode 'I'.*\[0, 70000\]"):
        AttentionSamplingImageProcessor()(image)
    fits = Image.fromarray(np.array([[0, 65535], [5, 6]], dtype=np.int32), mode="I")
    enc = AttentionSamplingImageProcessor()(fits)
    torch.testing.assert_close(normalised(enc)[0, 0, 0], torch.tensor([-1.0, 1.0], dtype=torch.float64))


def test_palette_png_gives_colours_not_indices(tmp_path):
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    indices = rng.integers(0, 256, (16, 12)).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(saved(image, tmp_path / "palette.png"))
    expected = torch.from_numpy(palette[indices]).permute(2, 0, 1)  # lookup by hand
    assert enc["pixel_values"].shape == (1, 3, 16, 12)
    assert torch.equal(enc["pixel_values"][0], expected)


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    indices = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.info["transparency"] = 0  # palette entry 0 fully transparent
    path = tmp_path / "transparent.png"
    image.save(path, transparency=0)
    enc = AttentionSamplingImageProcessor(low_res_scale=1.0)(path)
    px = enc["pixel_values"][0].permute(1, 2, 0)
    assert px[0, 0].tolist() == [255, 255, 255] and px[0, 1].tolist() == [200, 100, 50]


def test_one_bit_png_is_black_and_white_not_almost_black(tmp_path):
    bits = np.random.default_rng(2).random((9, 13)) > 0.5
    enc = AttentionSamplingImageProcessor(low_res_scale=1.0)(saved(Image.fromarray(bits), tmp_path / "bits.png"))
    assert torch.equal(enc["pixel_values"][0, 0], torch.from_numpy(bits.astype(np.uint8) * 255))
    torch.testing.assert_close(normalised(enc)[0, 0], torch.from_numpy(np.where(bits, 1.0, -1.0)))
    # a bool array means the same as a 1-bit image
    enc2 = AttentionSamplingImageProcessor(low_res_scale=1.0)(bits)
    assert torch.equal(enc2["pixel_values"], enc["pixel_values"])


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_on_white(mode, tmp_path):
    rng = np.random.default_rng(3)
    channels = 2 if mode == "LA" else 4
    data = rng.integers(0, 256, (8, 10, channels)).astype(np.uint8)
    path = saved(Image.fromarray(data, mode=mode), tmp_path / f"{mode}.png")
    enc = AttentionSamplingImageProcessor(low_res_scale=1.0)(path)
    colour, alpha = data[..., :-1].astype(np.float64), data[..., -1:].astype(np.float64) / 255
    expected = colour * alpha + 255 * (1 - alpha)  # over white
    got = enc["pixel_values"][0].permute(1, 2, 0).double().numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1.0  # 8-bit rounding


def test_cmyk_becomes_three_channels_and_grey_stays_grey_unless_asked(tmp_path):
    data = np.random.default_rng(4).integers(0, 256, (6, 7, 4)).astype(np.uint8)
    enc = AttentionSamplingImageProcessor(low_res_scale=1.0)(Image.fromarray(data, mode="CMYK"))
    assert enc["pixel_values"].shape == (1, 3, 6, 7)
    grey = np.random.default_rng(5).integers(0, 256, (6, 7)).astype(np.uint8)
    path = saved(Image.fromarray(grey), tmp_path / "grey.png")
    assert AttentionSamplingImageProcessor()(path)["pixel_values"].shape == (1, 1, 6, 7)
    enc = AttentionSamplingImageProcessor(do_convert_rgb=True)(path)
    assert enc["pixel_values"].shape == (1, 3, 6, 7)
    assert all(torch.equal(enc["pixel_values"][0, c], torch.from_numpy(grey)) for c in range(3))
    # a grey and a colour image in one batch: a clear error that names the fix
    with pytest.raises(ValueError, match="do_convert_rgb"):
        AttentionSamplingImageProcessor()([grey, np.zeros((6, 7, 3), np.uint8)])


def test_unknown_pil_mode_is_refused_by_name():
    class Odd:  # quacks like a PIL image of a mode no converter knows
        mode, size, info = "I;16S", (4, 4), {}

        def convert(self, mode):
            raise AssertionError("must not be called")

    with pytest.raises(ValueError, match=r"mode 'I;16S'.*accepted modes"):
        AttentionSamplingImageProcessor()(Odd())


# --- layouts, dtypes and shapes ----------------------------------------------------------------

def test_hwc_image_three_pixels_tall_is_not_read_as_chw():
    image = np.random.default_rng(6).integers(0, 256, (3, 40, 3)).astype(np.uint8)
    with pytest.raises(ValueError, match="input_data_format"):
        AttentionSamplingImageProcessor()(image)
    enc = AttentionSamplingImageProcessor(low_res_scale=1.0)(image, input_data_format="channels_last")
    assert torch.equal(enc["pixel_values"][0], torch.from_numpy(image).permute(2, 0, 1))
    enc = AttentionSamplingImageProcessor(low_res_scale=1.0, input_data_format="channels_first")(image)
    assert torch.equal(enc["pixel_values"][0], torch.from_numpy(image))
    with pytest.raises(ValueError, match="input_data_format must be one of"):
        AttentionSamplingImageProcessor(input_data_format="hwc")


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5, 6), (7, 8, 9)])
def test_wrong_rank_or_unreadable_shape_is_refused(shape):
    with pytest.raises(ValueError, match="shape|dimensions"):
        AttentionSamplingImageProcessor()(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (3, 0, 4)])
def test_empty_image_is_refused(shape):
    with pytest.raises(ValueError, match="empty"):
        AttentionSamplingImageProcessor()(np.zeros(shape, np.uint8), input_data_format=None if len(shape) == 2 else
                                          "channels_first")


def test_empty_batch_and_wrong_types_are_refused():
    with pytest.raises(ValueError, match="non-empty list"):
        AttentionSamplingImageProcessor()([])
    with pytest.raises(TypeError, match="accepted"):
        AttentionSamplingImageProcessor()([{"image": 1}])
    with pytest.raises(TypeError, match="complex|accepted"):
        AttentionSamplingImageProcessor()(torch.zeros(4, 4, dtype=torch.complex64))


def test_integer_dtypes_are_read_by_range():
    small = torch.tensor([[0, 128], [255, 7]], dtype=torch.int64)
    enc = AttentionSamplingImageProcessor(low_res_scale=1.0)(small)
    assert enc["pixel_values"].dtype == torch.uint8 and torch.equal(enc["pixel_values"][0, 0].long(), small)
    with pytest.raises(ValueError, match=r"values in \[-3, 255\]"):
        AttentionSamplingImageProcessor()(np.array([[-3, 255], [0, 0]], dtype=np.int16))
    with pytest.raises(ValueError, match="uint16"):
        AttentionSamplingImageProcessor()(np.array([[0, 1000], [0, 0]], dtype=np.int32))


def test_mixed_bit_depths_in_one_batch_keep_their_own_scale():
    a = np.full((4, 4), 255, np.uint8)
    b = np.full((4, 6), 65535, np.uint16)
    enc = AttentionSamplingImageProcessor(do_normalize=False)([a, b])
    assert enc["pixel_values"].dtype == torch.uint16
    full = normalised(enc)
    torch.testing.assert_close(full[0, 0, :, :4], torch.ones(4, 4, dtype=torch.float64))
    torch.testing.assert_close(full[1, 0], torch.ones(4, 6, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_are_refused_by_the_processor(bad):
    image = np.zeros((16, 16), np.float32)
    image[3, 5] = bad
    with pytest.raises(ValueError, match="image 1 has non-finite"):
        AttentionSamplingImageProcessor()([np.zeros((16, 16), np.float32), image])


def test_non_finite_pixels_reaching_the_model_are_refused_clearly():
    model = tiny_model(num_patches=64)  # samples every position of a 8x8 map: the NaN is read
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(np.zeros((32, 32), np.float32))
    pixels = enc["pixel_values"].float().clone()
    pixels[0, 0, 10, 10] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(pixel_values=pixels, low_res_pixel_values=enc["low_res_pixel_values"])
    low = enc["low_res_pixel_values"].clone()
    low[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="low_res_pixel_values of image 0 hold NaN"):
        model(**{**enc, "low_res_pixel_values": low})


def test_one_pixel_image_and_too_many_patches_give_clear_errors():
    enc = AttentionSamplingImageProcessor()(np.array([[7]], np.uint8))
    assert enc["low_res_sizes"].tolist() == [[1, 1]] and enc["low_res_pixel_values"].shape == (1, 1, 128, 128)
    with pytest.raises(ValueError, match="smaller than a patch"):
        tiny_model()(**enc)
    enc = AttentionSamplingImageProcessor(size={"height": 2, "width": 2})(np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match="cannot draw 5 distinct positions.*only 4"):
        tiny_model(num_patches=5)(**enc)


def test_model_refuses_raw_pixels_without_their_affine_map():
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25)(np.zeros((16, 16), np.uint8))
    model = tiny_model()
    with pytest.raises(ValueError, match="need pixel_scale and pixel_offset"):
        model(pixel_values=enc["pixel_values"], low_res_pixel_values=enc["low_res_pixel_values"])
    with pytest.raises(ValueError, match="together"):
        model(pixel_values=enc["pixel_values"], low_res_pixel_values=enc["low_res_pixel_values"],
              pixel_scale=enc["pixel_scale"])
    with pytest.raises(ValueError, match=r"pixel_scale must be finite, of shape \(1, 1\)"):
        model(**{**enc, "pixel_scale": torch.ones(1, 3)})
    with pytest.raises(ValueError, match="floating point"):
        model(**{**enc, "low_res_pixel_values": enc["low_res_pixel_values"].to(torch.uint8)})


# --- the raw full-resolution path against the normalised-float reference -------------------------

@pytest.mark.parametrize("multiscale", [False, True])
def test_raw_uint8_pixels_give_the_logits_of_normalised_float_pixels(multiscale):
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (32 + 8 * i, 40, 3)).astype(np.uint8) for i in range(2)]
    extra = dict(region_size=16, num_regions=2, region_downsample=4) if multiscale else {}
    model = tiny_model(channels=3, **extra)
    mean, std = [0.2, 0.4, 0.6], [0.3, 0.2, 0.1]
    enc = AttentionSamplingImageProcessor(low_res_scale=0.25, image_mean=mean, image_std=std)(images)
    assert enc["pixel_values"].dtype == torch.uint8
    reference = torch.zeros(2, 3, 40, 40)  # the old contract: normalised float32, zero padding
    for i, image in enumerate(images):
        x = torch.from_numpy(image).permute(2, 0, 1).double() / 255
        x = (x - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(std, dtype=torch.float64)[
            :, None, None]
        reference[i, :, : x.shape[1], : x.shape[2]] = x.float()
        low = F.interpolate(x[None], scale_factor=0.25, mode="area")[0].float()
        torch.testing.assert_close(enc["low_res_pixel_values"][i, :, : low.shape[1]], low, rtol=0, atol=1e-5)
    float_inputs = {k: v for k, v in enc.items() if k not in ("pixel_scale", "pixel_offset")}
    torch.manual_seed(3)
    raw = model(**enc, return_patches=True)
    torch.manual_seed(3)
    ref = model(**{**float_inputs, "pixel_values": reference}, return_patches=True)
    assert torch.equal(raw.sampled_positions, ref.sampled_positions)
    torch.testing.assert_close(raw.patches, ref.patches, rtol=0, atol=1e-5)
    torch.testing.assert_close(raw.logits, ref.logits, rtol=1e-4, atol=1e-5)


def test_single_image_is_not_copied_and_low_res_view_is_the_area_average():
    image = np.random.default_rng(8).integers(0, 256, (96, 64, 3)).astype(np.uint8)
    enc = AttentionSamplingImageProcessor(size={"height": 24, "width": 24})(image)
    assert enc["pixel_values"].data_ptr() == torch.from_numpy(image).data_ptr()  # a view of the input
    # fixed-size view by default: shrunk to fit (aspect kept: 24 x 16), padded to 24 x 24 with zeros
    assert enc["low_res_pixel_values"].shape == (1, 3, 24, 24) and enc["low_res_sizes"].tolist() == [[24, 16]]
    x = (torch.from_numpy(image).permute(2, 0, 1).double() / 255 - 0.5) / 0.5
    expected = F.interpolate(x[None], size=(24, 16), mode="area")[0].float()
    torch.testing.assert_close(enc["low_res_pixel_values"][0, :, :, :16], expected, rtol=0, atol=1e-5)
    assert bool((enc["low_res_pixel_values"][0, :, :, 16:] == 0).all())


@pytest.mark.parametrize("shape,size", [((50, 37), (16, 16)), ((41, 41, 3), (9, 13)), ((7, 5), (32, 32))])
def test_low_res_view_matches_area_interpolation_for_any_factor(shape, size):
    image = np.random.default_rng(9).integers(0, 256, shape).astype(np.uint8)
    enc = AttentionSamplingImageProcessor(low_res_size={"height": size[0], "width": size[1]}, do_normalize=False)(image)
    x = torch.from_numpy(image).double() / 255
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    expected = F.interpolate(x[None], size=size, mode="area")[0].float()
    torch.testing.assert_close(enc["low_res_pixel_values"][0], expected, rtol=0, atol=1e-5)


def test_numpy_tensors_and_bad_return_tensors():
    enc = AttentionSamplingImageProcessor()(np.zeros((8, 8), np.uint8), return_tensors="np")
    assert isinstance(enc["pixel_values"], np.ndarray) and enc["pixel_values"].dtype == np.uint8
    with pytest.raises(ValueError, match="return_tensors"):
        AttentionSamplingImageProcessor()(np.zeros((8, 8), np.uint8), return_tensors="tf")
    for bad in (dict(size={"height": 0, "width": 4}), dict(low_res_scale=0.0), dict(image_std=0.0),
                dict(rescale_factor=float("nan")), dict(image_mean=[0.1, 0.2], image_std=[0.1, 0.2, 0.3])):
        with pytest.raises(ValueError, match="AttentionSamplingImageProcessor"):
            AttentionSamplingImageProcessor(**bad)(np.zeros((8, 8, 3), np.uint8))


# --- megaNIST ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seed=-1), "seed must be an int >= 0"),
        (dict(seed=1.5), "seed must be an int >= 0"),
        (dict(test_fraction=0.999), "no digit of class"),
        (dict(test_fraction=0.001, split="test"), "no digit of class"),
        (dict(test_fraction=True), "test_fraction"),
        (dict(num_noise_lines=-1), "num_noise_lines"),
        (dict(num_digits=2.0), "num_digits must be an int"),
        (dict(canvas_size=100), "canvas_size"),
        (dict(split="val"), "split"),
    ],
)
def test_megamnist_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_megamnist(2, **kwargs)


# --- TIFF files (optional: tifffile) ------------------------------------------------------------

def test_tiff_files_read_by_layout_memory_mapped_and_refused_when_not_one_image(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    data = np.random.default_rng(10).integers(0, 256, (40, 24, 3)).astype(np.uint8)
    plain, tiled, planar, stack = (tmp_path / f"{n}.tif" for n in ("plain", "tiled", "planar", "stack"))
    tifffile.imwrite(plain, data, photometric="rgb")
    tifffile.imwrite(tiled, data, photometric="rgb", tile=(16, 16), compression="zlib")
    tifffile.imwrite(planar, data.transpose(2, 0, 1), photometric="rgb", planarconfig="separate")
    expected = torch.from_numpy(data).permute(2, 0, 1)
    proc = AttentionSamplingImageProcessor(low_res_scale=0.25)
    reference = proc(data)
    for path in (plain, str(tiled), planar):
        enc = proc(path)
        assert torch.equal(enc["pixel_values"][0], expected), path
        torch.testing.assert_close(enc["low_res_pixel_values"], reference["low_res_pixel_values"])
    assert isinstance(tifffile.memmap(plain, mode="r"), np.memmap)  # the uncompressed file is the lazy case
    tifffile.imwrite(stack, np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="axes"):
        proc(stack)


def test_pyramidal_tiff_low_res_view_comes_from_a_pyramid_level(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    data = np.random.default_rng(11).integers(0, 256, (64, 64)).astype(np.uint16) * 200
    levels = [np.full((32, 32), 1000, np.uint16), np.full((16, 16), 3000, np.uint16)]  # marked, not downsamples
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(data, subifds=2)
        for level in levels:
            tif.write(level, subfiletype=1)
    proc = AttentionSamplingImageProcessor(do_normalize=False)
    enc = proc(path, size={"height": 16, "width": 16})  # the 16 x 16 level fits exactly
    assert torch.equal(enc["pixel_values"][0, 0].to(torch.int64), torch.from_numpy(data.astype(np.int64)))
    torch.testing.assert_close(enc["low_res_pixel_values"][0, 0], torch.full((16, 16), 3000 / 65535))
    enc = proc(path, size={"height": 20, "width": 20})  # needs the 32 x 32 level, area-reduced
    torch.testing.assert_close(enc["low_res_pixel_values"][0, 0], torch.full((20, 20), 1000 / 65535))
    enc = proc(path, size={"height": 40, "width": 40})  # only level 0 is large enough
    expected = F.interpolate(torch.from_numpy(data.astype(np.float64))[None, None] / 65535, size=(40, 40), mode="area")
    torch.testing.assert_close(enc["low_res_pixel_values"][0, 0], expected[0, 0].float())


@pytest.mark.parametrize(
    "make",
    [
        lambda x: torch.tensor(0.3).expand(64, 48),  # stride 0
        lambda x: x.t().contiguous().t(),  # non-contiguous
        lambda x: x.half(),
        lambda x: x.bfloat16(),
        lambda x: x.double(),
        lambda x: torch.stack([x, x, x])[:, ::1, ::1].transpose(1, 2).transpose(1, 2),
    ],
)
def test_strided_and_low_precision_images_match_a_contiguous_float32_copy(make):
    image = make(torch.rand(64, 48))
    proc = AttentionSamplingImageProcessor(low_res_scale=0.25)
    enc, ref = proc(image), proc(image.float().contiguous())
    assert enc["pixel_values"].dtype == torch.float32
    assert torch.equal(enc["pixel_values"], ref["pixel_values"])
    torch.testing.assert_close(enc["low_res_pixel_values"], ref["low_res_pixel_values"], rtol=0, atol=1e-6)
    # and the contiguous copy agrees with area interpolation of the normalised image
    x = (image.double().contiguous() / 255 - 0.5) / 0.5
    x = x[None] if x.dim() == 2 else x
    expected = F.interpolate(x[None], scale_factor=0.25, mode="area")[0].float()
    torch.testing.assert_close(ref["low_res_pixel_values"][0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["sample_with_replacement", "sample_without_replacement"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_samplers_refuse_non_probabilities_naming_the_row(sampler, bad):
    from hf_efficient.vision.attention_sampling import sampling

    attention = torch.full((3, 8), 1 / 8)
    attention[2, 5] = bad
    with pytest.raises(ValueError, match="row 2 of attention holds NaN, inf or negative"):
        getattr(sampling, sampler)(attention, 2)
    with pytest.raises(ValueError, match="positive int"):
        getattr(sampling, sampler)(torch.full((3, 8), 1 / 8), True)


def test_tiled_compressed_pyramidal_tiff_is_read_tile_by_tile_with_the_same_patches(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    import pickle

    rng = np.random.default_rng(12)
    data = rng.integers(0, 256, (70, 90, 3)).astype(np.uint8)
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(data, photometric="rgb", tile=(16, 16), compression="zlib", subifds=1)
        tif.write(data[::2, ::2].copy(), photometric="rgb", tile=(16, 16), compression="zlib", subfiletype=1)
    other = rng.integers(0, 256, (40, 100, 3)).astype(np.uint8)  # an in-memory image in the same batch
    proc = AttentionSamplingImageProcessor(size={"height": 16, "width": 16})
    enc = proc([path, other])
    assert enc["pixel_values"].shape == (2, 3, 70, 100) and enc["pixel_values"].stride() == (0, 0, 0, 0)
    reader = enc["pixel_readers"][0]
    assert type(reader).__name__ == "TiledTiffReader"
    # windows across tile borders and beyond the image, against slicing the array
    padded = np.zeros((90, 110, 3), np.uint8)
    padded[10:80, 10:100] = data
    for top, left in [(-10, -10), (5, 7), (60, 80), (15, 31)]:
        expected = padded[top + 10 : top + 30, left + 10 : left + 30]
        assert np.array_equal(reader.read_window(top, left, 20, 20), expected)
        assert np.array_equal(pickle.loads(pickle.dumps(reader)).read_window(top, left, 20, 20), expected)
    # the model reads the same patches as from the images in memory
    reference = torch.zeros(2, 3, 70, 100, dtype=torch.uint8)
    reference[0, :, :, :90] = torch.from_numpy(data).permute(2, 0, 1)
    reference[1, :, :40] = torch.from_numpy(other).permute(2, 0, 1)
    in_memory = {k: v for k, v in enc.items() if k != "pixel_readers"}
    in_memory["pixel_values"] = reference
    for extra in ({}, dict(region_size=16, num_regions=2, region_downsample=4)):
        model = tiny_model(channels=3, **extra)
        torch.manual_seed(4)
        lazy = model(**enc, return_patches=True)
        torch.manual_seed(4)
        eager = model(**in_memory, return_patches=True)
        assert torch.equal(lazy.patch_top_left, eager.patch_top_left)
        assert torch.equal(lazy.patches, eager.patches)
        torch.testing.assert_close(lazy.logits, eager.logits)


def test_tiff_reader_decodes_each_tile_once_per_batch_and_keeps_a_bounded_cache(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from hf_efficient.vision import TiledTiffReader

    data = np.random.default_rng(13).integers(0, 256, (64, 80, 3)).astype(np.uint8)
    path = tmp_path / "tiles.tif"
    tifffile.imwrite(path, data, photometric="rgb", tile=(16, 16), compression="zlib")
    padded = np.zeros((96, 112, 3), np.uint8)
    padded[16:80, 16:96] = data

    def expected(windows):
        return np.stack([padded[t + 16 : t + 16 + h, left + 16 : left + 16 + w] for t, left, h, w in windows])

    # five windows inside the 2 x 2 tiles at the top left, overlapping each other
    shared = [(2, 3, 12, 12), (5, 5, 12, 12), (8, 1, 12, 12), (16, 16, 12, 12), (0, 0, 12, 12)]
    reader = TiledTiffReader(str(path), (3, 64, 80), np.uint8, cache_tiles=8)
    assert np.array_equal(reader.read_windows(shared), expected(shared))
    assert reader.tiles_decoded == 4  # not one decode per window and tile (16)
    assert np.array_equal(reader.read_windows(shared), expected(shared))
    assert reader.tiles_decoded == 4  # the next batch finds them in the cache
    uncached = TiledTiffReader(str(path), (3, 64, 80), np.uint8, cache_tiles=0)
    uncached.read_windows(shared)
    uncached.read_windows(shared)
    assert uncached.tiles_decoded == 8 and len(uncached._cache) == 0
    # windows over all 20 tiles (and past the border) with room for 3: the cache never grows past 3
    everywhere = [(t, left, 20, 20) for t in range(-8, 64, 16) for left in range(-8, 80, 16)]
    small = TiledTiffReader(str(path), (3, 64, 80), np.uint8, cache_tiles=3)
    assert np.array_equal(small.read_windows(everywhere), expected(everywhere))
    assert small.tiles_decoded == 20 and len(small._cache) == 3
    with pytest.raises(ValueError, match="cache_tiles"):
        TiledTiffReader(str(path), (3, 64, 80), np.uint8, cache_tiles=-1)


def test_a_processor_saved_before_the_fixed_size_default_keeps_its_scale(tmp_path):
    import json

    from transformers import AutoImageProcessor

    old = {"image_processor_type": "AttentionSamplingImageProcessor", "low_res_scale": 0.25, "low_res_size": None,
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": 0.5, "image_std": 0.5}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(old))
    AttentionSamplingConfig(num_channels=1).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    enc = loaded(np.zeros((64, 48), np.uint8))
    assert enc["low_res_pixel_values"].shape == (1, 1, 16, 12)  # the saved scale, not the 128 x 128 default


# ---------------------------------------------------------------- run_cnn (the channels-last layout on the CPU)
def _cnn(training: bool):
    from hf_efficient.vision.attention_sampling import build_feature_cnn

    torch.manual_seed(0)
    return build_feature_cnn(1, [4, 8]).train(training)


def test_run_cnn_gives_the_network_answer_for_nan_empty_and_repeated_calls():
    """run_cnn(net, x) must be net(x) whatever x holds: NaN stays where the convolutions take it (as in the default
    layout), an empty batch gives an empty batch, and a second call with the same input gives the same answer
    (the input is not written)."""
    from hf_efficient.vision.attention_sampling import run_cnn

    net = _cnn(False)  # eval: batch statistics would spread one image's NaN over the batch in both layouts
    x = torch.rand(3, 1, 12, 12)
    x[1, 0, 5, 5] = float("nan")
    kept = x.clone()
    got, want = run_cnn(net, x), net(x)
    assert torch.equal(got.isnan(), want.isnan()) and got[1].isnan().all() and got[[0, 2]].isfinite().all()
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-6)
    assert torch.equal(x.isnan(), kept.isnan()) and torch.equal(x.nan_to_num(), kept.nan_to_num())
    torch.testing.assert_close(run_cnn(net, x), got, equal_nan=True)
    empty = run_cnn(net, torch.rand(0, 1, 12, 12))
    assert empty.shape == (0, 8)


def test_run_cnn_refuses_a_wrong_dtype_or_shape_as_the_network_does():
    """A float64 or integer input to a float32 network, or a 3-D input, fails as the network itself fails."""
    from hf_efficient.vision.attention_sampling import run_cnn

    net = _cnn(False)
    for bad in (torch.rand(2, 1, 12, 12, dtype=torch.float64), torch.randint(0, 255, (2, 1, 12, 12)),
                torch.rand(2, 12, 12)):
        with pytest.raises(RuntimeError) as expected:
            net(bad)
        with pytest.raises(RuntimeError) as got:
            run_cnn(net, bad)
        assert type(got.value) is type(expected.value)


def test_the_layouts_benchmark_measures_both_layouts_and_their_precision(tmp_path, load_file_module):
    """--layouts --quick writes both timings and a float64 comparison in which the default layout is float32-exact;
    a second run into the same folder replaces only its own file."""
    bench = load_file_module("bench_attention_sampling_script", "scripts/bench_attention_sampling.py")
    other = tmp_path / "keep.txt"
    other.write_text("mine")
    out = tmp_path / "bench_attention_sampling_layouts.json"
    result = bench.run_layouts(256, 2, [4], [4, 8], 1, out)
    assert set(result["step_seconds"]) == {"run_cnn", "default"} and all(t > 0 for t in result["step_seconds"].values())
    errors = result["batch_norm_training_relative_error_vs_float64"]
    assert errors["default"] < 1e-5 and errors["channels_last"] > errors["default"]
    assert other.read_text() == "mine" and out.is_file()
