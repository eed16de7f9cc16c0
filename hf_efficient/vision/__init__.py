"""Vision: attention sampling for megapixel images and the megaNIST generator."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["attention_sampling"],
    submod_attrs={
        "attention_sampling": ["AttentionSamplingConfig", "AttentionSamplingForImageClassification",
                               "AttentionSamplingImageProcessor", "AttentionSamplingOutput", "TiledTiffReader"],
        "megamnist": ["attention_on_digits", "load_megamnist", "make_megamnist", "write_megamnist"],
    },
)
