"""patch_model on the real offline SmolLM2-135M (Llama, grouped-query attention 9/3 heads)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_efficient.assets import require_asset, smollm2_path
from hf_efficient.integrations import patch_model, unpatch_model

TEXTS = ["To be, or not to be, that is the question:", "Something is rotten in the state of Denmark."]


# 30 layers of a 135M model: tens of seconds on a loaded 2-core machine, so outside the CI budget.
@pytest.mark.slow
def test_smollm2_padding_cache_and_unpatch():
    require_asset("smollm2_gguf")
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())
    with torch.no_grad():
        before = model(**batch).logits
    patch_model(model, "linear", keep_softmax_first=2, keep_softmax_last=2)
    with torch.no_grad():  # logits are O(10); a padding leak moves them by whole units
        patched = model(**batch).logits
        for i, text in enumerate(TEXTS):
            alone = model(**tokenizer([text], return_tensors="pt")).logits
            torch.testing.assert_close(patched[i, : alone.shape[1]], alone[0], atol=2e-3, rtol=1e-3)
        # decoding one token with the cache gives the logits of the full forward
        ids = tokenizer([TEXTS[0]], return_tensors="pt")["input_ids"]
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=prefix.past_key_values).logits
        full = model(ids).logits
    torch.testing.assert_close(step[0, -1], full[0, -1], atol=2e-3, rtol=1e-3)
    real = batch["attention_mask"].bool()
    assert (patched - before)[real].abs().max() > 1e-2  # an approximation, not softmax
    unpatch_model(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
