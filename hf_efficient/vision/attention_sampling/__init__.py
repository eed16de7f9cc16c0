"""Attention sampling (Katharopoulos & Fleuret, ICML 2019): config, image processor and classifier.

:mod:`hf_efficient.registration` registers them with ``AutoConfig``, ``AutoImageProcessor`` and
``AutoModelForImageClassification`` under the model type ``"attention_sampling"`` (``import
hf_efficient`` does it). Each class is also marked for remote code in its own module:
``save_pretrained`` copies their (self-contained) source files next to the weights and writes an
``auto_map``, so a process without hf_efficient loads the folder with ``trust_remote_code=True``.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "configuration_attention_sampling": ["AttentionSamplingConfig"],
        "modeling_attention_sampling": ["AttentionSamplingForImageClassification", "AttentionSamplingOutput",
                                        "AttentionSamplingPreTrainedModel", "build_attention_cnn",
                                        "build_feature_cnn", "run_cnn"],
        "processing_attention_sampling": ["AttentionSamplingImageProcessor", "TiledTiffReader"],
        "sampling": ["attention_distribution", "expectation", "expectation_weights", "extract_patches",
                     "negative_entropy", "nested_expectation_weights", "patch_top_left", "sample_with_replacement",
                     "sample_without_replacement"],
    },
)
