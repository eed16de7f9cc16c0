"""Image processor for attention sampling: a low-resolution view plus the full image as it came.

The full-resolution image is never rescaled, normalised or copied to float: ``pixel_values`` keep
the input's integer dtype (uint8 or uint16) and, for a single image, its memory layout. The
processor returns, per image and channel, the affine map ``pixel_scale * x + pixel_offset`` that
rescaling and normalisation amount to; the model applies it to the sampled patches only. The
low-resolution view is made in one pass of area (box) reduction over strips of rows, so no full-size
float copy is ever made.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

_NAME = "AttentionSamplingImageProcessor"
# PIL modes read as they are, and how the others are converted (see _pil_to_array)
_PIL_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
              "I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_LAYOUTS = ("channels_first", "channels_last", "none")
_STRIP_ELEMENTS = 1 << 20  # elements of one float strip of the low-resolution reduction (4 MiB)
_UINT16_FACTOR = 255.0 / 65535.0  # 16-bit full scale maps where 8-bit full scale does


def _composite_on_white(image: Any) -> Any:
    """A PIL image with alpha -> RGB or L over a white background (transparent pixels read as white)."""
    from PIL import Image

    grey = image.mode in ("LA", "La")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    out = Image.alpha_composite(background, rgba)
    return out.convert("L" if grey else "RGB")


def _pil_to_array(image: Any, index: int, do_convert_rgb: bool) -> np.ndarray:
    """A PIL image -> ``(H, W)`` or ``(H, W, C)`` array in a dtype whose full scale is known.

    ``1`` -> uint8 0/255; ``L`` uint8; ``LA``/``RGBA``/``P`` with transparency composited on white;
    ``P`` (palette) -> RGB colours, never indices; ``CMYK``/``YCbCr``/``LAB``/``HSV`` -> RGB;
    ``I;16*`` -> uint16; ``I`` (how some decoders open 16-bit PNGs) -> uint16 when its values fit,
    else refused; ``F`` -> float32.
    """
    mode = image.mode
    if mode not in _PIL_MODES:
        raise ValueError(
            f"{_NAME}: image {index} is a PIL image of mode {mode!r}, which it cannot read; accepted modes: "
            f"{', '.join(_PIL_MODES)} (convert it first, e.g. image.convert('RGB'))"
        )
    if mode in ("LA", "La", "RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        image = _composite_on_white(image)
    elif mode == "1":
        image = image.convert("L")  # 0/255, not 0/1
    elif mode in ("P", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    if do_convert_rgb and image.mode == "L":
        image = image.convert("RGB")
    mode = image.mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        array = np.asarray(image)
    if mode.startswith("I;16"):
        array = array.astype(np.uint16, copy=False)  # big-endian I;16B becomes native
    elif mode == "I":
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0 or high > 65535:
            raise ValueError(
                f"{_NAME}: image {index} is a 32-bit integer PIL image (mode 'I') with values in [{low}, {high}]; "
                "accepted: values in [0, 65535] (read as 16-bit). Convert it to 'F' or scale it first"
            )
        array = array.astype(np.uint16)
    return array


_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8")


class _Pyramid:
    """The smaller levels of a pyramidal TIFF, read only when the low-resolution view asks for one."""

    def __init__(self, path: str, shapes: list[tuple[int, int]], channels_first: bool, tif: Any = None) -> None:
        # tif: the file already opened by the processor (opening a TIFF parses its pages: done once)
        self.path, self.shapes, self.channels_first, self.tif = path, shapes, channels_first, tif

    def level_for(self, height: int, width: int) -> torch.Tensor | None:
        """The smallest level at least ``height x width`` as ``(C, h, w)``, or None if level 0 is the smallest."""
        import tifffile

        fits = [k for k, (h, w) in enumerate(self.shapes) if k > 0 and h >= height and w >= width]
        if not fits:
            return None
        if self.tif is not None:
            array = self.tif.series[0].levels[fits[-1]].asarray()
        else:
            array = tifffile.imread(self.path, level=fits[-1])
        level = torch.from_numpy(np.ascontiguousarray(array))
        if level.dim() == 2:
            return level[None]
        return level if self.channels_first else level.permute(2, 0, 1)


class TiledTiffReader:
    """Reads windows of level 0 of a tiled TIFF, decoding only the tiles a window overlaps.

    The model calls :meth:`read_windows` for the sampled patches (and regions) of one image; nothing
    else of level 0 is ever read. Each tile those windows need is decoded once per call, however many
    windows share it, and the ``cache_tiles`` most recently used decoded tiles are kept for later
    calls: memory stays bounded by ``cache_tiles`` tiles plus the tiles of one call. The file is opened
    on first use and neither it nor the cache is pickled, so readers cross process boundaries
    (data-loader workers) as their path.

    Attributes:
        shape: ``(channels, height, width)`` of level 0; ``dtype``: its numpy dtype.
    """

    def __init__(self, path: str, shape: tuple[int, int, int], dtype: np.dtype, expand_to: int | None = None,
                 cache_tiles: int = 64, tif: Any = None) -> None:
        self.path, self.shape, self.dtype, self.expand_to = path, shape, np.dtype(dtype), expand_to
        if not isinstance(cache_tiles, int) or isinstance(cache_tiles, bool) or cache_tiles < 0:
            raise ValueError(f"TiledTiffReader: cache_tiles must be an int >= 0, got {cache_tiles!r}")
        self.cache_tiles = cache_tiles
        self.tiles_decoded = 0  # how many tile decodes this reader has done (cache misses)
        self._tif = tif  # an open tifffile.TiffFile of path, or None: opened on first use
        self._keyframe = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tif": None, "_keyframe": None, "_cache": OrderedDict()}

    def _page(self):
        import tifffile

        if self._tif is None:
            self._tif = tifffile.TiffFile(self.path)
        if self._keyframe is None:
            self._keyframe = self._tif.series[0].levels[0].keyframe
        return self._tif, self._keyframe

    def _tile(self, index: int, held: dict[int, np.ndarray]) -> np.ndarray:
        """Decoded tile ``index`` ``(tile_h, tile_w, C)``: from this call's tiles, the cache, or the file."""
        tile = held.get(index)
        if tile is None:
            tile = self._cache.pop(index, None)
            if tile is None:
                tif, page = self._page()
                tif.filehandle.seek(page.dataoffsets[index])
                raw = tif.filehandle.read(page.databytecounts[index])
                tile = page.decode(raw, index, jpegtables=page.jpegtables)[0]
                tile = tile.reshape(page.tilelength, page.tilewidth, self.shape[0])
                self.tiles_decoded += 1
            held[index] = tile
        return tile

    def _remember(self, held: dict[int, np.ndarray]) -> None:
        """Keep the ``cache_tiles`` most recently used tiles of this call and earlier ones."""
        for index, tile in held.items():
            self._cache[index] = tile
            self._cache.move_to_end(index)
        while len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)

    def _window(self, top: int, left: int, height: int, width: int, held: dict[int, np.ndarray]) -> np.ndarray:
        c, h, w = self.shape
        out = np.zeros((height, width, c), dtype=self.dtype)
        r0, r1, c0, c1 = max(top, 0), min(top + height, h), max(left, 0), min(left + width, w)
        if r0 < r1 and c0 < c1:
            _, page = self._page()
            th, tw = page.tilelength, page.tilewidth
            across = -(-w // tw)
            for ty in range(r0 // th, (r1 - 1) // th + 1):
                for tx in range(c0 // tw, (c1 - 1) // tw + 1):
                    tile = self._tile(ty * across + tx, held)
                    # the part of this tile inside the window, in image coordinates
                    y0, y1 = max(r0, ty * th), min(r1, (ty + 1) * th)
                    x0, x1 = max(c0, tx * tw), min(c1, (tx + 1) * tw)
                    out[y0 - top : y1 - top, x0 - left : x1 - left] = tile[y0 - ty * th : y1 - ty * th,
                                                                           x0 - tx * tw : x1 - tx * tw]
        if self.expand_to is not None and c == 1:
            out = np.repeat(out, self.expand_to, axis=-1)
        return out

    def read_windows(self, windows: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
        """``(len(windows), height, width, C)`` pixels of same-sized ``(top, left, height, width)`` windows.

        Zeros where a window leaves the image. Every tile is decoded at most once per call.
        """
        held: dict[int, np.ndarray] = {}
        try:
            out = [self._window(*window, held) for window in windows]
        finally:
            self._remember(held)
        c = self.expand_to if self.expand_to is not None and self.shape[0] == 1 else self.shape[0]
        if not out:
            return np.zeros((0, 0, 0, c), dtype=self.dtype)
        return np.stack(out)

    def read_window(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """``(height, width, C)`` pixels at ``(top, left)`` of level 0; zeros where the window leaves the image."""
        return self.read_windows([(top, left, height, width)])[0]

    def read_all(self) -> np.ndarray:
        """All of level 0 as ``(H, W)`` or ``(H, W, C)`` (only when no pyramid level can stand in for it)."""
        import tifffile

        return tifffile.imread(self.path)


class _TensorReader:
    """:meth:`TiledTiffReader.read_window` over an in-memory ``(C, H, W)`` image, for batches mixing both."""

    def __init__(self, image: torch.Tensor) -> None:
        self.image = image

    def read_window(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        c, h, w = self.image.shape
        out = torch.zeros((c, height, width), dtype=self.image.dtype)
        r0, r1, c0, c1 = max(top, 0), min(top + height, h), max(left, 0), min(left + width, w)
        if r0 < r1 and c0 < c1:
            out[:, r0 - top : r1 - top, c0 - left : c1 - left] = self.image[:, r0:r1, c0:c1]
        return out.permute(1, 2, 0).numpy()

    def read_windows(self, windows: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
        return np.stack([self.read_window(*window) for window in windows])


def _read_tiff(path: str, index: int) -> tuple[np.ndarray | TiledTiffReader, str, _Pyramid | None]:
    """A TIFF file -> (level 0, its axes, the pyramid or None).

    Level 0 is memory-mapped when stored uncompressed, so its pixels are read from disk only where
    something looks at them; a tiled (e.g. compressed) level 0 of a pyramidal file becomes a
    :class:`TiledTiffReader`, which decodes only the tiles the sampled patches overlap. Other files
    are read whole.
    """
    import tifffile

    # the file is opened (its pages parsed) once; a tile reader and the pyramid keep using this handle
    tif = tifffile.TiffFile(path)
    keep_open = False
    try:
        series = tif.series[0]
        axes = series.axes
        levels = series.levels
        shapes = [(lvl.shape[axes.index("Y")], lvl.shape[axes.index("X")]) for lvl in levels]
        page = levels[0].keyframe
        tiled_contiguous = page.is_tiled and (page.planarconfig == 1 or page.samplesperpixel == 1)
        shape, dtype = series.shape, series.dtype
        if axes not in ("YX", "YXS", "SYX"):
            raise ValueError(
                f"{_NAME}: image {index} is the TIFF {path!r} with axes {axes!r}; accepted: one 2-d image, grey or "
                "with samples (axes YX, YXS or SYX)"
            )
        pyramid = _Pyramid(path, shapes, axes == "SYX") if len(shapes) > 1 else None
        if series.dataoffset is not None:  # stored uncompressed in one run: memory-mapped
            return tifffile.memmap(path, mode="r"), axes, pyramid
        if pyramid is not None and tiled_contiguous and axes in ("YX", "YXS") and dtype in (np.uint8, np.uint16):
            channels = shape[2] if axes == "YXS" else 1
            pyramid.tif = tif
            keep_open = True
            return TiledTiffReader(path, (channels, shape[0], shape[1]), dtype, tif=tif), axes, pyramid
        return series.asarray(), axes, pyramid
    finally:
        if not keep_open:
            tif.close()


def _as_tensor(
    image: Any, index: int, do_convert_rgb: bool
) -> tuple[torch.Tensor, str | None, tuple[_Pyramid | None, TiledTiffReader | None] | None]:
    """One image (PIL, numpy, torch or a path) -> a tensor sharing memory with it where possible.

    Also returns the layout of decoded images (PIL, files: ``"channels_last"``, ``"channels_first"``
    or ``"none"``; None for arrays, whose layout is inferred) and, for TIFF files, their pyramid and
    tile reader. TIFF files are read with ``tifffile`` when it is installed (see :func:`_read_tiff`);
    a tile-read image comes back as a zero-stride stand-in tensor of its shape and dtype.
    """
    if isinstance(image, str | os.PathLike):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ValueError(f"{_NAME}: image {index} is the path {path!r}, which is not a file")
        if path.lower().endswith(_TIFF_SUFFIXES) and importlib.util.find_spec("tifffile") is not None:
            data, axes, pyramid = _read_tiff(path, index)
            if isinstance(data, TiledTiffReader):  # a stand-in of the right shape and dtype, no memory
                c, h, w = data.shape
                stand_in = torch.zeros((), dtype=torch.from_numpy(np.zeros(0, data.dtype)).dtype).expand(c, h, w)
                return stand_in, "channels_first", (pyramid, data)
            tensor, _, _ = _as_tensor(data, index, do_convert_rgb)
            layout = {"YX": "none", "YXS": "channels_last", "SYX": "channels_first"}[axes]
            return tensor, layout, (pyramid, None) if pyramid is not None else None
        from PIL import Image

        with Image.open(path) as opened:
            opened.load()
            return _as_tensor(opened, index, do_convert_rgb)
    if hasattr(image, "convert") and hasattr(image, "mode") and hasattr(image, "size"):  # PIL, without importing it
        array = _pil_to_array(image, index, do_convert_rgb)
        return _as_tensor(array, index, do_convert_rgb)[0], "channels_last" if array.ndim == 3 else "none", None
    if isinstance(image, np.ndarray):
        if image.dtype.byteorder not in ("=", "|") and image.dtype.itemsize > 1:
            image = image.astype(image.dtype.newbyteorder("="))
        with warnings.catch_warnings():  # read-only arrays (e.g. from PIL): we never write to them
            warnings.simplefilter("ignore")
            try:
                return torch.from_numpy(image), None, None
            except TypeError as error:
                raise TypeError(
                    f"{_NAME}: image {index} is a numpy array of dtype {image.dtype}; accepted: uint8, uint16, "
                    "bool, other integers with values in [0, 255], or floating point"
                ) from error
    if isinstance(image, torch.Tensor):
        return image.detach().cpu(), None, None
    raise TypeError(
        f"{_NAME}: image {index} has type {type(image).__name__}; accepted: PIL.Image, numpy array, torch tensor "
        "of shape (H, W), (H, W, C) or (C, H, W), or a path to an image file"
    )


def _canonical_dtype(tensor: torch.Tensor, index: int) -> tuple[torch.Tensor, float]:
    """Keep uint8/uint16/float32 as they are; return the tensor and its full-scale factor.

    The factor multiplies ``rescale_factor``: 1 for 8-bit and float data, ``255/65535`` for 16-bit.
    """
    dtype = tensor.dtype
    if dtype in (torch.uint8, torch.float32):
        return tensor, 1.0
    if dtype == torch.uint16:
        return tensor, _UINT16_FACTOR
    if dtype == torch.bool:
        return tensor.to(torch.uint8) * 255, 1.0  # a binary mask: white where True, as PIL's mode '1'
    if dtype.is_floating_point:
        return tensor.float(), 1.0
    if dtype.is_complex:
        raise TypeError(f"{_NAME}: image {index} has dtype {dtype}; accepted: real pixel values")
    if tensor.numel():
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{_NAME}: image {index} has dtype {dtype} with values in [{low}, {high}]; integer images other than "
                "uint8/uint16 are read as 8-bit and need values in [0, 255]. Pass uint16 for 16-bit data, or floats"
            )
    return tensor.to(torch.uint8), 1.0


def _to_chw(tensor: torch.Tensor, index: int, layout: str | None) -> torch.Tensor:
    """``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` -> a ``(C, H, W)`` view (no copy)."""
    if tensor.dim() == 2 and layout in (None, "none"):
        return tensor[None]
    if tensor.dim() != 3 or layout == "none":
        raise ValueError(
            f"{_NAME}: image {index} has shape {tuple(tensor.shape)}; accepted: (H, W), (H, W, C) or (C, H, W)"
            + (f" (input_data_format={layout!r})" if layout else "")
        )
    if layout is None:
        first, last = tensor.shape[0] <= 4, tensor.shape[-1] <= 4
        if first and last:
            raise ValueError(
                f"{_NAME}: image {index} has shape {tuple(tensor.shape)}, which reads as channels-first or as "
                "channels-last; pass input_data_format='channels_first' or 'channels_last'"
            )
        if not (first or last):
            raise ValueError(
                f"{_NAME}: image {index} has shape {tuple(tensor.shape)}: neither its first nor its last axis looks "
                "like channels (1 to 4); pass input_data_format or an (H, W) / (H, W, C) / (C, H, W) image"
            )
        layout = "channels_first" if first else "channels_last"
    return tensor if layout == "channels_first" else tensor.permute(2, 0, 1)


def _area_reduce(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Area (box) downsampling of a ``(C, H, W)`` image of any dtype and layout -> float32 ``(C, height, width)``.

    Equal to ``F.interpolate(image.float()[None], (height, width), mode="area")[0]`` but reads the image
    in strips of rows, so only one strip at a time exists in float; integer factors reduce in the
    image's own memory order.
    """
    c, h, w = image.shape
    if height > h or width > w:  # upsampling: the image is smaller than the view, so it is cheap
        return F.interpolate(image.float()[None], size=(height, width), mode="area")[0]
    out = torch.empty(c, height, width)
    if h % height == 0 and w % width == 0:
        kh, kw = h // height, w // width
        channels_last = c > 1 and image.stride(0) == 1
        rows = max(1, _STRIP_ELEMENTS // max(1, kh * w * c))  # output rows per strip
        for i in range(0, height, rows):
            j = min(height, i + rows)
            if channels_last:
                strip = image[:, i * kh : j * kh].permute(1, 2, 0).float()  # (rows*kh, W, C)
                out[:, i:j] = strip.reshape(j - i, kh, width, kw, c).mean(dim=(1, 3)).permute(2, 0, 1)
            else:
                strip = image[:, i * kh : j * kh].float()
                out[:, i:j] = strip.reshape(c, j - i, kh, width, kw).mean(dim=(2, 4))
        return out
    # other factors: area pooling is separable; pool the width strip by strip, then the height
    columns = torch.empty(c, h, width)
    rows = max(1, _STRIP_ELEMENTS // max(1, w * c))
    for i in range(0, h, rows):
        j = min(h, i + rows)
        columns[:, i:j] = F.adaptive_avg_pool2d(image[:, i:j].float()[None], (j - i, width))[0]
    return F.adaptive_avg_pool2d(columns[None], (height, width))[0]


class AttentionSamplingImageProcessor(BaseImageProcessor):
    r"""Prepare images of any size for :class:`AttentionSamplingForImageClassification`.

    For every image it returns the full-resolution image *as it came* (patches are sampled from it;
    it is never rescaled or copied to float) and a low-resolution view (the attention network reads
    it), rescaled and normalised. Rescaling and normalisation of the full image are returned as a
    per-channel affine map that the model applies to the sampled patches only.

    Images: PIL images (every common mode is converted by its meaning: 16-bit stays 16-bit, palette
    images become colours, 1-bit becomes 0/255, alpha is composited on white; unknown modes are
    refused), numpy arrays and torch tensors of shape ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``
    (uint8, uint16, bool, floats, or other integers in ``[0, 255]``), or paths to image files.
    TIFF files are read with ``tifffile`` when it is installed (``pip install hf-efficient[vision]``):
    uncompressed ones are memory-mapped, so only the pixels the model samples (and the low-resolution
    view's one pass) are read from disk; a pyramidal TIFF's smallest level at least as large as the
    view is read instead of level 0 for the view. A tiled (e.g. compressed) pyramidal TIFF is never
    read whole: the batch then carries ``pixel_readers`` (one per image; in-memory images of the same
    batch are wrapped too) and a zero-stride stand-in ``pixel_values`` of the batch's shape, and the
    model decodes only the tiles its sampled patches overlap. Memory-mapped images stay lazy for one
    image per call; several are copied into one padded tensor.

    Args:
        size: ``{"height": h, "width": w}``, the low-resolution view's size (the default, 128 x 128).
            The image is shrunk to fit, keeping its aspect ratio, and padded at the bottom/right, so
            the attention cost does not grow with the image; images smaller than ``size`` are not
            enlarged.
        low_res_scale: instead of ``size``, a view of ``round(scale * H) x round(scale * W)``.
        low_res_size: instead of ``size``, an exact ``{"height": h, "width": w}`` view, stretched
            to it whatever the aspect ratio.
        do_resize: False makes the low-resolution view the image itself (only for small images).
        do_convert_rgb: convert grey images to RGB (3 channels); None or False keeps grey images grey.
        do_rescale: multiply pixel values by ``rescale_factor`` (``1/255`` for 8-bit images; 16-bit
            images use ``rescale_factor * 255 / 65535`` so both map full scale to the same value).
        do_normalize: subtract ``image_mean`` and divide by ``image_std`` (one value per channel, or
            one value for all).
        input_data_format: ``"channels_first"``, ``"channels_last"`` or ``"none"`` (2-d images); by
            default inferred from the shape, and an ambiguous shape (e.g. ``(3, W, 3)``) is refused.

    Returns (``__call__``): a ``BatchFeature`` with
        ``pixel_values`` ``(batch, channels, H_max, W_max)`` in the input dtype (uint8, uint16 or
        float32; a single image is a view of the input, several are zero-padded at the bottom/right),
        ``pixel_scale`` and ``pixel_offset`` ``(batch, channels)`` float32: normalised pixels are
        ``pixel_values * pixel_scale + pixel_offset``,
        ``low_res_pixel_values`` ``(batch, channels, h_max, w_max)`` float32, normalised, zero padding,
        ``image_sizes`` ``(batch, 2)`` and ``low_res_sizes`` ``(batch, 2)`` long valid ``(height, width)``,
        ``pixel_readers`` (only for tiled TIFF files, see above): a list with one reader per image.
    """

    model_input_names = [
        "pixel_values", "low_res_pixel_values", "image_sizes", "low_res_sizes", "pixel_scale", "pixel_offset",
        "pixel_readers",
    ]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        low_res_scale: float | None = None,
        low_res_size: dict[str, int] | None = None,
        do_resize: bool = True,
        do_convert_rgb: bool | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | list[float] = 0.5,
        image_std: float | list[float] = 0.5,
        input_data_format: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.size = dict(size) if size is not None else {"height": 128, "width": 128}
        self.low_res_scale = low_res_scale
        self.low_res_size = dict(low_res_size) if low_res_size is not None else None
        self.do_resize = bool(do_resize)
        self.do_convert_rgb = do_convert_rgb
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = image_mean
        self.image_std = image_std
        self.input_data_format = input_data_format
        self._check(self.size, low_res_scale, self.low_res_size, input_data_format)
        per_channel = max(np.size(image_mean), np.size(image_std))
        self._affine(per_channel, do_rescale, do_normalize)  # checks the mean/std and the rescale factor

    @staticmethod
    def _check(size: dict | None, scale: float | None, low_size: dict | None, layout: Any) -> None:
        for name, value in (("size", size), ("low_res_size", low_size)):
            if value is None:
                continue
            if (
                not isinstance(value, dict)
                or set(value) != {"height", "width"}
                or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value.values())
            ):
                raise ValueError(f"{_NAME}: {name} must be {{'height': int >= 1, 'width': int >= 1}}, got {value!r}")
        if scale is not None and (
            not isinstance(scale, int | float) or isinstance(scale, bool) or not 0.0 < scale <= 1.0
        ):
            raise ValueError(f"{_NAME}: low_res_scale must be in (0, 1], got {scale!r}")
        _layout(layout)

    def _affine(self, channels: int, do_rescale: bool, do_normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(scale, offset)`` float64 ``(channels,)`` of rescale + normalise for 8-bit data."""
        factor = self.rescale_factor if do_rescale else 1.0
        if not isinstance(factor, int | float) or isinstance(factor, bool) or not np.isfinite(factor) or factor <= 0:
            raise ValueError(f"{_NAME}: rescale_factor must be a finite float > 0, got {factor!r}")
        scale = torch.full((channels,), float(factor), dtype=torch.float64)
        offset = torch.zeros(channels, dtype=torch.float64)
        if do_normalize:
            mean = torch.as_tensor(self.image_mean, dtype=torch.float64).reshape(-1)
            std = torch.as_tensor(self.image_std, dtype=torch.float64).reshape(-1)
            if mean.numel() not in (1, channels) or std.numel() not in (1, channels):
                raise ValueError(
                    f"{_NAME}: image_mean/image_std have {mean.numel()}/{std.numel()} values for a {channels}-channel "
                    "image; give one value or one per channel"
                )
            if not bool(torch.isfinite(mean).all()) or not bool((std > 0).all()) or not bool(torch.isfinite(std).all()):
                raise ValueError(
                    f"{_NAME}: image_mean must be finite and image_std finite and > 0, got {self.image_mean!r} and "
                    f"{self.image_std!r}"
                )
            scale, offset = scale / std, -mean / std * torch.ones(channels, dtype=torch.float64)
        return scale, offset

    def _low_res_shape(self, h: int, w: int, size: dict | None, scale: float | None, low_size: dict | None,
                       do_resize: bool) -> tuple[int, int]:
        if not do_resize:
            return h, w
        if low_size is not None:
            return low_size["height"], low_size["width"]
        if scale is not None:
            return max(1, round(h * scale)), max(1, round(w * scale))
        fit = min(1.0, size["height"] / h, size["width"] / w)  # shrink to fit, keep the aspect ratio
        return min(size["height"], max(1, round(h * fit))), min(size["width"], max(1, round(w * fit)))

    def preprocess(  # type: ignore[override]
        self,
        images: Any,
        size: dict[str, int] | None = None,
        low_res_scale: float | None = None,
        low_res_size: dict[str, int] | None = None,
        do_resize: bool | None = None,
        do_convert_rgb: bool | None = None,
        do_rescale: bool | None = None,
        do_normalize: bool | None = None,
        input_data_format: str | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Process one image or a list of images (see the class docstring for the outputs)."""
        if kwargs:
            raise TypeError(f"{_NAME}: unexpected arguments {sorted(kwargs)}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"{_NAME}: return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        # a view chosen at call time replaces the processor's own (low_res_size > low_res_scale > size)
        if size is None and low_res_scale is None and low_res_size is None:
            size, scale, low_size = self.size, self.low_res_scale, self.low_res_size
        else:
            scale, low_size = low_res_scale, None if low_res_size is None else dict(low_res_size)
            size = dict(size) if size is not None else {"height": 128, "width": 128}
        layout = _layout(self.input_data_format if input_data_format is None else input_data_format)
        self._check(size, scale, low_size, layout)
        do_resize = self.do_resize if do_resize is None else do_resize
        do_convert_rgb = bool(self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb)
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        do_normalize = self.do_normalize if do_normalize is None else do_normalize

        is_array = isinstance(images, torch.Tensor | np.ndarray)
        is_path = isinstance(images, str | os.PathLike)
        is_single = (is_array and images.ndim <= 3) or hasattr(images, "convert") or is_path
        if is_single:
            images = [images]
        elif is_array and images.ndim == 4:  # (batch, ...) array: a batch of same-sized images
            images = list(images)
        elif is_array:
            raise ValueError(
                f"{_NAME}: an array of images must have 2 to 4 dimensions, got shape {tuple(images.shape)}"
            )
        elif not isinstance(images, Sequence) or len(images) == 0:
            raise ValueError(f"{_NAME}: expected an image or a non-empty list of images, got {type(images).__name__}")

        full, factors, lazy = [], [], []
        for i, raw in enumerate(images):
            tensor, decoded_layout, tiff_parts = _as_tensor(raw, i, do_convert_rgb)
            tensor, factor = _canonical_dtype(tensor, i)
            image = _to_chw(tensor, i, decoded_layout or layout)
            if do_convert_rgb and image.shape[0] == 1:
                image = image.expand(3, -1, -1)
            if image.shape[1] < 1 or image.shape[2] < 1:
                raise ValueError(f"{_NAME}: image {i} is empty, shape {tuple(tensor.shape)}")
            if image.dtype == torch.float32 and not bool(torch.isfinite(image).all()):
                raise ValueError(
                    f"{_NAME}: image {i} has non-finite pixel values (NaN or inf); accepted: finite values"
                )
            full.append(image)
            factors.append(factor)
            lazy.append(tiff_parts)  # (pyramid, tile reader) of a TIFF file, else None
        channels = {t.shape[0] for t in full}
        if len(channels) != 1:
            raise ValueError(
                f"{_NAME}: images in one batch must share a channel count, got {sorted(channels)}"
                + ("; set do_convert_rgb=True to make grey images RGB" if channels == {1, 3} else "")
            )
        c = channels.pop()
        base_scale, base_offset = self._affine(c, do_rescale, do_normalize)
        if not do_rescale:
            factors = [1.0] * len(full)
        pixel_scale = torch.tensor(factors, dtype=torch.float64)[:, None] * base_scale[None]  # (batch, C)
        pixel_offset = base_offset[None].expand(len(full), c)

        low = []
        for k, image in enumerate(full):
            h, w = image.shape[-2:]
            low_hw = self._low_res_shape(h, w, size, scale, low_size, do_resize)
            pyramid, reader = lazy[k] if lazy[k] is not None else (None, None)
            level = pyramid.level_for(*low_hw) if pyramid is not None else None
            if level is None and reader is not None:  # no smaller level will do: level 0 is read whole
                level = _to_chw(_canonical_dtype(torch.from_numpy(reader.read_all()), k)[0], k,
                                "channels_last" if reader.shape[0] > 1 else "none")
            if level is not None and do_convert_rgb and level.shape[0] == 1:
                level = level.expand(3, -1, -1)
            # a pyramid level of the TIFF stands in for the full image: level 0 is never read whole
            view_k = _area_reduce(level if level is not None else image, *low_hw).double()
            low.append((view_k * pixel_scale[k, :, None, None] + pixel_offset[k, :, None, None]).float())
        low_res = _pad_stack(low)
        if low_size is None and scale is None and do_resize:
            # a fixed-size view: pad every batch to `size`, so the attention map has one shape
            padded = low_res.new_zeros(low_res.shape[0], c, size["height"], size["width"])
            padded[:, :, : low_res.shape[-2], : low_res.shape[-1]] = low_res
            low_res = padded
        readers = [parts[1] if parts is not None else None for parts in lazy]
        if any(r is not None for r in readers):
            # tile-read images: pixel_values is a zero-stride stand-in of the batch's shape, and the model
            # reads the sampled patches of every image through pixel_readers
            for k, reader in enumerate(readers):
                if reader is None:
                    readers[k] = _TensorReader(full[k])
                elif do_convert_rgb:
                    reader.expand_to = c
            h_max, w_max = max(t.shape[-2] for t in full), max(t.shape[-1] for t in full)
            dtype = _pad_stack([t[:, :1, :1] for t in full]).dtype
            pixel_values = torch.zeros((), dtype=dtype).expand(len(full), c, h_max, w_max)
        else:
            readers, pixel_values = None, _pad_stack(full)
        data = {
            "pixel_values": pixel_values,
            "pixel_scale": pixel_scale.float(),
            "pixel_offset": pixel_offset.float().contiguous(),
            "low_res_pixel_values": low_res,
            "image_sizes": torch.tensor([t.shape[-2:] for t in full], dtype=torch.long),
            "low_res_sizes": torch.tensor([t.shape[-2:] for t in low], dtype=torch.long),
        }
        if readers is not None:
            data["pixel_readers"] = readers
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["pixel_readers"])


def _layout(value: Any) -> str | None:
    """``input_data_format`` (a string or transformers' ``ChannelDimension``) -> one of ``_LAYOUTS`` or None."""
    if value is None:
        return None
    name = getattr(value, "value", value)
    name = {"channels_first": "channels_first", "channels_last": "channels_last", "none": "none"}.get(name)
    if name is None:
        raise ValueError(f"{_NAME}: input_data_format must be one of {_LAYOUTS} or None, got {value!r}")
    return name


def _pad_stack(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``(C, H_i, W_i)`` tensors into ``(batch, C, H_max, W_max)``, zero padding bottom/right.

    One image comes back as a view of itself (no copy, its memory layout kept).
    """
    if len(images) == 1:
        return images[0][None]
    dtypes = {t.dtype for t in images}  # uint8 with uint16 -> uint16; any float -> float32
    dtype = torch.float32 if torch.float32 in dtypes else torch.uint16 if torch.uint16 in dtypes else torch.uint8
    h = max(t.shape[-2] for t in images)
    w = max(t.shape[-1] for t in images)
    out = torch.zeros((len(images), images[0].shape[0], h, w), dtype=dtype)
    for i, t in enumerate(images):
        out[i, :, : t.shape[-2], : t.shape[-1]] = t
    return out


# save_pretrained copies this file next to the weights and names it in the config's auto_map
AttentionSamplingImageProcessor.register_for_auto_class("AutoImageProcessor")
