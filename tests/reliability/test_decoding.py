"""Misuse of the decoding fast path (place_for_decoding, huge_page_copies, HF_EFFICIENT_HUGE_PAGES, the fused
decoder layers): a clear error naming what is accepted, or the right answer."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hf_efficient import LinearAttentionCache, patch_model, place_for_decoding
from hf_efficient.decoding import DecodeLinear
from hf_efficient_kernels.cpu import load_decode_extension
from hf_efficient_kernels.memory import huge_page_copies


def test_place_for_decoding_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        place_for_decoding({"weight": torch.ones(3)})


def test_place_for_decoding_keeps_nan_skips_integers_and_a_second_call_moves_nothing():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[1, 2] = math.nan
    model[1].register_buffer("steps", torch.arange(5))  # not a parameter of a linear layer: left alone
    want = model[0].weight.detach().clone()
    assert place_for_decoding(model) == sum(p.numel() * 4 for p in model.parameters())
    assert torch.equal(model[0].weight.isnan(), want.isnan())
    assert torch.equal(model[0].weight.nan_to_num(), want.nan_to_num())
    assert place_for_decoding(model) == 0
    assert place_for_decoding(nn.Sequential()) == 0  # nothing to place


def test_huge_page_copies_of_nothing_and_a_bad_advice_setting(monkeypatch):
    assert huge_page_copies([]) == []
    monkeypatch.setenv("HF_EFFICIENT_HUGE_PAGES", "yes")
    with pytest.raises(ValueError, match="HF_EFFICIENT_HUGE_PAGES='yes'.*accepted"):
        huge_page_copies([torch.ones(3)])


def test_a_bad_kernels_setting_is_refused_when_placement_reads_it(monkeypatch):
    monkeypatch.setenv("HF_EFFICIENT_KERNELS", "fast")
    with pytest.raises(ValueError, match="HF_EFFICIENT_KERNELS='fast'"):
        patch_model(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16,
                                                 num_hidden_layers=1, num_attention_heads=2)), "linear")


def test_decode_linear_takes_wrong_dtypes_and_empty_input_through_torch():
    layer = DecodeLinear(4, 3)
    x = torch.randn(1, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # float64 input against float32 weights: torch's own dtype error
        layer(x)
    assert layer(torch.randn(0, 4)).shape == (0, 3)


@pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")
def test_a_cache_filled_by_another_decoder_is_refused_by_name():
    def decoder(heads: int):
        torch.manual_seed(0)
        return patch_model(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16,
                                                        num_hidden_layers=1, num_attention_heads=heads)).eval(),
                           "window-linear", window=3)

    small, large = decoder(2), decoder(4)
    cache = LinearAttentionCache(config=small.config)
    with torch.no_grad():
        small(torch.tensor([[1, 2, 3, 4]]), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="do not fit"):  # the compiled step steps aside; the check names it
            large(torch.tensor([[5]]), cache=cache, use_cache=True)


def test_a_cache_left_by_a_failed_call_says_so_and_reset_recovers():
    """A step that fails part-way (a cache of another kind) leaves the cache out of step: the next call's error
    names that case, and ``reset()`` makes the cache usable again."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_efficient import LinearAttentionCache, patch_model

    config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    torch.manual_seed(0)
    window = patch_model(LlamaForCausalLM(LlamaConfig(**config)).eval(), "window-linear", window=4)
    linear = patch_model(LlamaForCausalLM(LlamaConfig(**config)).eval(), "linear")
    cache = LinearAttentionCache(config=window.config)
    with torch.no_grad():
        window(torch.randint(0, 64, (2, 5)), cache=cache)
        with pytest.raises(ValueError, match="kind 'linear'"):
            linear(torch.tensor([[3], [4]]), cache=cache)
        with pytest.raises(ValueError, match="earlier call with this cache stopped with an error"):
            window(torch.tensor([[3], [4]]), cache=cache)
        cache.reset()
        ids = torch.randint(0, 64, (2, 5))
        again = window(ids, cache=cache).logits
        fresh = window(ids, cache=LinearAttentionCache(config=window.config)).logits
    torch.testing.assert_close(again, fresh)


def _window_llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    return patch_model(LlamaForCausalLM(config).eval(), "window-linear", window=3)


def _steps(model, embeds: list[torch.Tensor]) -> torch.Tensor:
    cache = LinearAttentionCache(config=model.config)
    with torch.no_grad():
        model(torch.arange(2 * 5).view(2, 5) % 64, cache=cache)
        return torch.cat([model(inputs_embeds=e.to(model.dtype), cache=cache).logits for e in embeds], dim=1)


def _with_nan(model, seed: int, steps: int, step: int, feature: int, monkeypatch):
    """The logits of ``steps`` random embeddings (row 0 of step ``step`` NaN at ``feature``) on ``model`` as it
    runs, and on a float64 copy through its modules."""
    torch.manual_seed(seed)
    embeds = [torch.randn(2, 1, 32) for _ in range(steps)]
    embeds[step][0, 0, feature] = float("nan")
    got = _steps(model, embeds)
    with monkeypatch.context() as patcher:
        patcher.setenv("HF_EFFICIENT_KERNELS", "reference")
        want = _steps(copy.deepcopy(model).double(), [e.double() for e in embeds])
    return embeds, got, want


def test_the_model_step_keeps_nan_in_its_row_and_takes_other_dtypes_like_the_modules(monkeypatch):
    """A NaN embedding spoils only its row, later steps of the other row stay those of the modules (float64); a
    bfloat16 input to a float32 model gives what the modules give."""
    model = _window_llama()
    embeds, got, want = _with_nan(model, 1, 3, 0, 3, monkeypatch)
    assert torch.isnan(got[0]).all() and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-4, atol=1e-4)
    half = [e.to(torch.bfloat16) for e in embeds[1:]]
    cache_fast, cache_ref = LinearAttentionCache(config=model.config), LinearAttentionCache(config=model.config)
    with torch.no_grad():
        for cache in (cache_fast, cache_ref):
            model(torch.arange(2 * 5).view(2, 5) % 64, cache=cache)
        fast = [model(inputs_embeds=e, cache=cache_fast).logits for e in half]
        monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")
        ref = [model(inputs_embeds=e, cache=cache_ref).logits for e in half]
    torch.testing.assert_close(torch.cat(fast, 1), torch.cat(ref, 1))


def test_an_empty_step_fails_as_unpatched_and_leaves_the_cache_in_step():
    """An empty batch or sequence fails inside transformers as it does for the unpatched model; the cache has not
    moved, so the next step is the one an untouched cache gives."""
    model = _window_llama()
    ids = torch.arange(2 * 5).view(2, 5) % 64
    caches = [LinearAttentionCache(config=model.config) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids, cache=cache)
        for empty in (torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)):
            with pytest.raises((RuntimeError, ValueError)):
                model(empty, cache=caches[0])
        assert caches[0].get_seq_length() == caches[1].get_seq_length() == 5
        torch.testing.assert_close(model(ids[:, :1], cache=caches[0]).logits, model(ids[:, :1], cache=caches[1]).logits)


def test_the_downsampled_baseline_never_writes_into_a_folder_that_holds_other_files(tmp_path, load_file_module):
    baseline = load_file_module("hf_efficient_train_downsampled_cnn", "scripts/train_downsampled_cnn.py")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="never overwritten"):
        baseline.main(["--data-dir", str(folder), "--output", str(tmp_path / "out.json")])
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"] and (folder / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "out.json").exists()


def _linear_lm(tied: bool = False):
    from hf_efficient import LinearLMConfig, LinearLMForCausalLM

    torch.manual_seed(0)
    return LinearLMForCausalLM(LinearLMConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, tie_word_embeddings=tied)).eval()


@pytest.mark.parametrize("kind", ["linear", "window-linear"])
def test_a_reset_cache_refilled_in_another_dtype_is_refused(kind):
    """After reset() a cache takes the dtype of whoever fills it next: a float32 step must then refuse a cache that
    a bfloat16 copy refilled, as it refuses one filled that way from the start."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    model = patch_model(LlamaForCausalLM(config).eval(), kind, **({"window": 3} if kind == "window-linear" else {}))
    cache = LinearAttentionCache(config=model.config)
    ids = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        model(ids, cache=cache)
        cache.reset()
        copy.deepcopy(model).to(torch.bfloat16)(ids, cache=cache)
        with pytest.raises(ValueError, match="bfloat16 model"):
            model(torch.tensor([[3]]), cache=cache)
    assert cache.get_seq_length() == 4


def test_linear_lm_decodes_with_a_parametrized_head_and_after_an_export():
    """The decoding checks read weights as attributes (an adapter or a parametrization gives them as properties), and
    nothing a torch.export trace computed (fake tensors) is kept for later calls."""
    import torch.nn.utils.parametrize as parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    model = _linear_lm()
    ids = torch.randint(1, 40, (1, 5))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.lm_head.weight.mul_(2)
        reference.model.layers[-1].mlp.down_proj.weight.mul_(2)
    parametrize.register_parametrization(model.lm_head, "weight", Doubled())
    parametrize.register_parametrization(model.model.layers[-1].mlp.down_proj, "weight", Doubled())
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(got, reference.generate(ids, max_new_tokens=4, do_sample=False))

    class Logits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(input_ids=x, use_cache=False).logits

    plain = _linear_lm()
    torch.export.export(Logits(plain), (ids,))
    with torch.no_grad():
        logits = plain(ids).logits
        assert type(logits) is torch.Tensor
        torch.testing.assert_close(logits, _linear_lm()(ids).logits)
        assert plain.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_linear_lm_names_a_cache_of_another_batch_size():
    """A float32 linear-lm step with a cache filled for another batch size gets the cache's own error (which says
    what to do), not the kernel's shape check."""
    model = _linear_lm()
    cache = LinearAttentionCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(1, 40, (2, 5)), cache=cache)
        with pytest.raises(ValueError, match="holds states for batch 2"):
            model(torch.tensor([[3]]), cache=cache)
    assert cache.get_seq_length() == 5


@pytest.mark.parametrize("kind", ["linear", "window-linear"])
def test_a_cache_copied_mid_decode_continues_twice_like_the_modules(kind, monkeypatch):
    """The compiled step stores each new state without checking it again: a cache copied mid-decode and both copies
    continued with the same tokens must give the same logits, and those of the modules (float64, PyTorch path)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    model = patch_model(LlamaForCausalLM(config).eval(), kind, **({"window": 3} if kind == "window-linear" else {}))
    reference = copy.deepcopy(model).double()
    ids = torch.randint(0, 64, (2, 4))

    def run(m, env):
        if env:
            monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")
        cache = LinearAttentionCache(config=m.config)
        with torch.no_grad():
            m(ids, cache=cache)
            m(torch.full((2, 1), 5), cache=cache)
            twin = copy.deepcopy(cache)
            a = torch.cat([m(torch.full((2, 1), 7 + t), cache=cache).logits for t in range(4)], dim=1)
            b = torch.cat([m(torch.full((2, 1), 7 + t), cache=twin).logits for t in range(4)], dim=1)
        monkeypatch.delenv("HF_EFFICIENT_KERNELS", raising=False)
        assert cache.get_seq_length() == twin.get_seq_length() == 9
        return a, b

    a, b = run(model, False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    want, _ = run(reference, True)
    torch.testing.assert_close(a.double(), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- window buffers appended in place
def _window_model(window: int = 3):
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    return patch_model(LlamaForCausalLM(config).eval(), "window-linear", window=window)


def _fork(cache: LinearAttentionCache, how: str) -> LinearAttentionCache:
    if how == "deepcopy":
        return copy.deepcopy(cache)
    if how == "pickle":
        import pickle

        return pickle.loads(pickle.dumps(cache))
    twin = copy.copy(cache)  # "shallow": layer copies holding the very same state objects and buffers
    twin.layers = [copy.copy(layer) for layer in cache.layers]
    return twin


@pytest.mark.parametrize("how", ["shallow", "deepcopy", "pickle"])
def test_window_buffers_appended_in_place_never_change_a_held_or_forked_state(how, monkeypatch):
    """The compiled window-linear step writes each new key into the row after the buffered ones, in the same
    buffers, while no other state has gone past them. Copies of a cache continued with different tokens, one step
    each in turn, and past the point where a buffer is full and moves (window 3: room for 18 rows), must each give
    the modules' logits (float64, PyTorch path); states held from before must keep their values."""
    model = _window_model()
    reference = copy.deepcopy(model).double()
    ids = torch.randint(0, 64, (2, 4))
    common = [5, 9]
    branch_a, branch_b = [7 + t % 50 for t in range(30)], [40 - t % 30 for t in range(30)]

    with torch.no_grad():
        cache = LinearAttentionCache(config=model.config)
        model(ids, cache=cache)
        for t in common:
            model(torch.full((2, 1), t), cache=cache)
        assert all(layer.window_ring() is not None for layer in cache.layers)  # the step made the buffers
        held = [layer.state for layer in cache.layers]
        frozen = [tuple(x.clone() for x in (s.keys, s.values, s.mask)) for s in held]
        twin = _fork(cache, how)
        got_a, got_b = [], []
        for a, b in zip(branch_a, branch_b):  # interleaved: each copy's step sees the other's writes
            got_a.append(model(torch.full((2, 1), a), cache=cache).logits)
            got_b.append(model(torch.full((2, 1), b), cache=twin).logits)
    for state, before in zip(held, frozen):
        assert all(torch.equal(x, y) for x, y in zip((state.keys, state.values, state.mask), before))
    for layer in (*cache.layers, *twin.layers):  # the size reported counts the buffers' room for the next keys
        state = layer.state
        buffers = sum(t.untyped_storage().nbytes() for t in (state.keys, state.values, state.mask))
        assert layer.window_ring() is not None and layer.nbytes() == state.linear.nbytes() + buffers

    monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")

    def modules(tokens):
        ref = LinearAttentionCache(config=reference.config)
        with torch.no_grad():
            reference(ids, cache=ref)
            return torch.cat([reference(torch.full((2, 1), t), cache=ref).logits for t in common + tokens],
                             dim=1)[:, len(common):]

    torch.testing.assert_close(torch.cat(got_a, dim=1).double(), modules(branch_a), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(got_b, dim=1).double(), modules(branch_b), rtol=1e-4, atol=1e-4)


def test_a_window_state_reordered_replaced_or_reset_is_copied_not_appended_to(monkeypatch):
    """Only the state the compiled step made may be appended to: after reorder_cache (beam search), a state put in
    by hand, or a reset and a new prompt, the next step copies the buffer, and the old buffers keep their values."""
    model = _window_model()
    ids = torch.randint(0, 64, (2, 4))
    with torch.no_grad():
        cache = LinearAttentionCache(config=model.config)
        model(ids, cache=cache)
        model(torch.full((2, 1), 5), cache=cache)
        layer = cache.layers[0]
        old = layer.state
        kept = old.keys.clone()
        cache.reorder_cache(torch.tensor([1, 0]))
        assert layer.window_ring() is None
        model(torch.full((2, 1), 6), cache=cache)
        assert layer.state.keys.untyped_storage().data_ptr() != old.keys.untyped_storage().data_ptr()
        assert torch.equal(old.keys, kept)
        layer.state = layer.state._replace(keys=layer.state.keys.clone())  # by hand: an equal state, not ours
        assert layer.window_ring() is None
        model(torch.full((2, 1), 7), cache=cache)
        assert layer.window_ring() is not None
        cache.reset()
        assert all(x.window_ring() is None for x in cache.layers)
        model(ids, cache=cache)
        assert layer.window_ring() is None  # the prefill's state comes from the modules


def test_the_block_kernel_refuses_an_append_it_cannot_keep_inside_the_buffer():
    """``append=True`` writes one row past the given view: the kernel checks the layout and the storage first and
    writes nothing when they do not hold it (a bad call must not reach memory outside the buffer)."""
    if load_decode_extension() is None:
        pytest.skip("the decoding extension did not build")
    ops = torch.ops.hf_efficient_decode_cpu
    torch.manual_seed(0)
    c, h, d, inter, r, window = 8, 2, 4, 12, 2, 4
    weights = [torch.ones(c), torch.randn(h * d, c), torch.randn(h * d, c), torch.randn(h * d, c),
               torch.randn(c, h * d), torch.ones(c), torch.randn(inter, c), torch.randn(inter, c),
               torch.randn(c, inter)]
    none = [None] * 7
    x = torch.randn(1, 1, c)

    def call(keys, values, mask, append=True, win=window):
        return ops.decoder_block_step(x, weights, none, None, None, None, None, keys, values, mask, h, h, d, 1, win,
                                      0.5, 1e-6, 1e-6, append)

    def buffers(cap):
        return torch.randn(1, h, cap, d), torch.randn(1, h, cap, d), torch.ones(1, cap, dtype=torch.bool)

    kb, vb, mb = buffers(r)  # exactly full: no row after the view
    before = [t.clone() for t in (kb, vb, mb)]
    with pytest.raises(RuntimeError, match="capacity"):
        call(kb, vb, mb)
    assert all(torch.equal(t, b) for t, b in zip((kb, vb, mb), before))
    kb, vb, mb = buffers(6)
    snapshot = [t.clone() for t in (kb, vb, mb)]
    end = [t.narrow(-2 if t.dim() == 4 else -1, 6 - r, r) for t in (kb, vb, mb)]  # the view ends each head's rows
    with pytest.raises(RuntimeError, match="capacity"):
        call(*end)
    def short():  # room for 3 rows a head, but the storage stops after the last head's second row
        return torch.randn(h * 3 * d - d).as_strided((1, h, r, d), (h * 3 * d, 3 * d, d, 1))

    with pytest.raises(RuntimeError, match="past the end"):
        call(short(), short(), mb[:, :r])
    with pytest.raises(RuntimeError, match="window of at least 2"):
        call(*[t.narrow(-2 if t.dim() == 4 else -1, 0, 0) for t in (kb, vb, mb)], win=1)
    with pytest.raises(RuntimeError, match="mask"):
        call(kb[:, :, :r], vb[:, :, :r], torch.ones(1, 2 * r, dtype=torch.bool)[:, ::2])
    with pytest.raises(RuntimeError, match="laid out"):  # values of another layout than keys
        call(kb[:, :, :r], torch.randn(1, h, r + 3, d)[:, :, :r], mb[:, :r])
    assert all(torch.equal(t, s) for t, s in zip((kb, vb, mb), snapshot))  # refused calls wrote nothing
    out = call(kb[:, :, :r], vb[:, :, :r], mb[:, :r])  # room after the view: row r is written, nothing else
    assert out[3].data_ptr() == kb.data_ptr() and tuple(out[3].shape) == (1, h, r + 1, d)
    assert torch.equal(kb[:, :, :r], snapshot[0][:, :, :r]) and torch.equal(kb[:, :, r + 1:], snapshot[0][:, :, r + 1:])
    assert not torch.equal(kb[:, :, r], snapshot[0][:, :, r]) and bool(mb[0, r])


def test_an_append_from_crafted_views_is_refused_before_any_write():
    """Strides and offsets of an append come from the caller: an empty view at an offset near 2**63 (which torch
    accepts) or batch strides whose products overflow must be refused, not wrapped around to an address before the
    buffer; keys and values sharing memory with each other or with another input must be refused too (the new row
    would land in what the step reads or returns)."""
    if load_decode_extension() is None:
        pytest.skip("the decoding extension did not build")
    ops = torch.ops.hf_efficient_decode_cpu
    torch.manual_seed(0)
    c, h, d, inter, r = 8, 2, 4, 12, 2
    weights = [torch.ones(c), torch.randn(h * d, c), torch.randn(h * d, c), torch.randn(h * d, c),
               torch.randn(c, h * d), torch.ones(c), torch.randn(inter, c), torch.randn(inter, c),
               torch.randn(c, inter)]
    x = torch.randn(1, 1, c)

    def call(keys, values, mask, kv=None, k_sum=None, xx=x):
        return ops.decoder_block_step(xx, weights, [None] * 7, None, None, kv, k_sum, keys, values, mask, h, h, d, 1,
                                      4, 0.5, 1e-6, 1e-6, True)

    arena = torch.zeros(64)
    far = arena.as_strided((1, h, 0, d), (h * d, d, d, 1), 2**63 - d)  # empty: torch checks no bounds
    with pytest.raises(RuntimeError, match="a buffered key"):
        call(far, far.clone(), torch.ones(1, 0, dtype=torch.bool))
    wide = torch.zeros(64).as_strided((4, h, 0, d), (2**62, 2**61, d, 1))
    with pytest.raises(RuntimeError, match="a buffered key"):
        call(wide, wide.clone(), torch.ones(4, 0, dtype=torch.bool), xx=torch.randn(4, 1, c))
    assert not arena.any()

    keys, mask = torch.randn(1, h, 8, d), torch.ones(1, 8, dtype=torch.bool)
    snapshot = keys.clone()
    with pytest.raises(RuntimeError, match="buffers of their own"):
        call(keys[:, :, :r], keys[:, :, :r], mask[:, :r])  # keys and values the same view
    with pytest.raises(RuntimeError, match="buffers of their own"):
        call(keys[:, :, :r], keys[:, :, r : 2 * r], mask[:, :r])  # values start at the row keys would write
    values = torch.randn(1, h, 8, d)
    packed = torch.zeros(1, h, 8, d)  # a linear state carved from the keys' buffer
    with pytest.raises(RuntimeError, match="no other input shares"):
        call(packed[:, :, :r], values[:, :, :r], mask[:, :r],
             kv=packed.as_strided((1, h, d, d), (h * 8 * d, 8 * d, d, 1), 4 * d), k_sum=torch.zeros(1, h, d))
    assert torch.equal(keys, snapshot)


def test_a_layer_continuing_a_copy_of_another_layers_state_gets_its_own_row():
    """Within one model step every block's step is built before any runs: with layer 1 holding a ``copy.copy`` of
    layer 0's cache layer, both could find the same free row. The first to be built claims it; the other copies the
    window. Logits must be the modules' and layer 0's committed states must not change afterwards."""
    model = _window_model(window=4)
    reference = copy.deepcopy(model).double()
    ids = torch.tensor([[3, 4, 5, 6]])
    tokens = [7, 8, 11, 12, 13]

    def run(m):
        cache = LinearAttentionCache(config=m.config)
        held = []
        with torch.no_grad():
            m(ids, cache=cache)
            for t in (5, 9):
                m(torch.full((1, 1), t), cache=cache)
            cache.layers[1] = copy.copy(cache.layers[0])
            out = []
            for t in tokens:
                out.append(m(torch.full((1, 1), t), cache=cache).logits)
                state = cache.layers[0].state
                held.append((state, state.keys.clone(), state.values.clone()))
        return torch.cat(out, dim=1), held

    got, held = run(model)
    assert all(torch.equal(s.keys, k) and torch.equal(s.values, v) for s, k, v in held)
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setenv("HF_EFFICIENT_KERNELS", "reference")
        want, _ = run(reference)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_copies_of_a_cache_decoded_in_two_threads_match_the_modules(monkeypatch):
    """Two threads, each continuing its own ``copy.copy`` of one cache (shared window buffers): the row a step
    appends to is claimed under a lock, so the two never write the same row."""
    import threading

    model = _window_model(window=8)
    reference = copy.deepcopy(model).double()
    ids = torch.tensor([[3, 4, 5, 6, 7]])

    def forks(m):
        cache = LinearAttentionCache(config=m.config)
        with torch.no_grad():
            m(ids, cache=cache)
            m(torch.full((1, 1), 9), cache=cache)
        return [_fork(cache, "shallow") for _ in range(2)]

    def branch(m, cache, seed, out):
        with torch.no_grad():
            out.extend(m(torch.full((1, 1), 3 + (seed * 7 + t) % 50), cache=cache).logits for t in range(30))

    monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")
    want = []
    for seed, cache in enumerate(forks(reference)):
        want.append([])
        branch(reference, cache, seed, want[-1])
    monkeypatch.delenv("HF_EFFICIENT_KERNELS")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns as often as the interpreter allows: a race would show
    try:
        for _ in range(10):
            outs = [[], []]
            threads = [threading.Thread(target=branch, args=(model, cache, seed, out))
                       for seed, (cache, out) in enumerate(zip(forks(model), outs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for got, ref in zip(outs, want):
                torch.testing.assert_close(torch.cat(got, dim=1).double(), torch.cat(ref, dim=1), rtol=1e-4,
                                           atol=1e-4)
    finally:
        sys.setswitchinterval(interval)


def test_a_block_needing_gradients_takes_the_modules_even_with_kernels_forced_and_unbuilt(monkeypatch):
    """A tensor that needs a gradient is routing (the PyTorch path is right), not a failure: with
    ``implementation="kernel"`` and a failed build the block step gives None rather than raising."""
    from hf_efficient_kernels import dispatch

    monkeypatch.setattr(dispatch, "_decode_cpu_kernel", lambda: (False, "simulated build failure"))
    c, h, d, inter = 8, 2, 4, 12
    weights = [torch.ones(c), torch.randn(h * d, c, requires_grad=True), torch.randn(h * d, c),
               torch.randn(h * d, c), torch.randn(c, h * d), torch.ones(c), torch.randn(inter, c),
               torch.randn(inter, c), torch.randn(c, inter)]
    state = {"kv": torch.zeros(1, h, d, d), "k_sum": torch.zeros(1, h, d)}

    def build():
        return dispatch.decoder_block_step_kernel(torch.randn(1, 1, c), weights, [None] * 7, None, state, h, h, d,
                                                  "elu", 0, 0.5, 1e-6, 1e-6, implementation="kernel")

    assert build() is None
    weights[1].requires_grad_(False)
    with pytest.raises(RuntimeError, match="could not be built"):
        build()


def test_nan_in_one_row_stays_there_while_keys_are_appended_and_the_buffers_move(monkeypatch):
    """A NaN embedding in row 0 goes into that row's window keys, appended in place and then copied when the
    buffers fill (window 3: room for 18 rows); row 1's logits must stay the modules' (float64) at every step."""
    _, got, want = _with_nan(_window_model(window=3), 2, 26, 2, 5, monkeypatch)
    assert torch.isnan(got[0, 2:]).all() and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0, :2].double(), want[0, :2], rtol=1e-4, atol=1e-4)


def _wrap_forward(module: nn.Module, calls: list, scale: float | None = None) -> None:
    """Set a ``forward`` on the module object, as accelerate's hooks and users' wrappers do: counted, and scaling a
    tensor output (a result the compiled step cannot know)."""
    original = module.forward

    def forward(*args, **kwargs):
        calls.append(1)
        out = original(*args, **kwargs)
        return out * scale if scale is not None else out

    module.forward = forward


def _decoded(model, steps: int = 4) -> torch.Tensor:
    cache = LinearAttentionCache(config=model.config)
    with torch.no_grad():
        model(torch.arange(2 * 5).view(2, 5) % 40, cache=cache)
        return torch.cat([model(torch.full((2, 1), 3 + t), cache=cache).logits for t in range(steps)], dim=1)


@pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")
@pytest.mark.parametrize("where", ["base model", "decoder layer", "projection", "activation", "final norm",
                                   "linear-lm layer", "linear-lm final norm", "linear-lm activation"])
def test_a_forward_set_on_a_module_object_runs_on_every_decoding_step(where, monkeypatch):
    """A forward set on a module object (accelerate's add_hook_to_module, a user's wrapper) is a hook: decoding
    steps run it as the prefill does, and give the logits of the modules."""
    linear_lm = where.startswith("linear-lm")
    model = _linear_lm() if linear_lm else _window_llama()
    base = model.model
    module = {"base model": base, "decoder layer": base.layers[1], "projection": base.layers[0].mlp.up_proj,
              "activation": base.layers[0].mlp.act_fn, "final norm": base.norm, "linear-lm layer": base.layers[1],
              "linear-lm final norm": base.norm, "linear-lm activation": base.layers[0].mlp.act_fn}[where]
    calls = []
    _wrap_forward(module, calls, None if where == "base model" else 0.5)
    got = _decoded(model)
    assert len(calls) == 1 + 4  # the prefill and every step
    monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")
    want = _decoded(model)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")
def test_another_activation_set_in_a_linear_lm_block_is_computed_not_replaced_by_silu(monkeypatch):
    model = _linear_lm()
    model.model.layers[0].mlp.act_fn = nn.GELU()  # the config still says silu
    got = _decoded(model)
    monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")
    torch.testing.assert_close(got, _decoded(model), rtol=1e-4, atol=1e-4)


def test_decoding_kernels_count_as_built_only_with_their_direct_calls(monkeypatch):
    """The build is usable only once its direct calls are in place (another thread reads them as soon as the build
    counts as done); without them every decoding kernel routes to PyTorch, and "kernel" names the failed build."""
    from hf_efficient_kernels import cpu, dispatch

    monkeypatch.setattr(dispatch, "_DECODE_BUILT", False)
    monkeypatch.setattr(dispatch, "_DECODE_CALLS", None)
    monkeypatch.setattr(cpu, "decode_calls", lambda: None)
    monkeypatch.setattr(cpu, "load_decode_extension", lambda: object())
    monkeypatch.setattr(cpu, "decode_build_error", lambda: "no direct calls")
    x, weight = torch.randn(1, 1, 8), torch.ones(8)
    assert dispatch.decode_rms_norm_kernel(x, weight, 1e-6) is None
    assert dispatch.rope_cos_sin_kernel(8, 10000.0, 3) is None
    assert dispatch.decode_gemv_kernel(x, torch.ones(4, 8)) is None
    assert dispatch._DECODE_BUILT is False
    with pytest.raises(RuntimeError, match="no direct calls"):
        dispatch.decode_rms_norm_kernel(x, weight, 1e-6, implementation="kernel")


def test_the_compiled_final_norm_takes_nan_empty_and_other_dtypes_like_the_module():
    from hf_efficient.decoding import rms_norm_step

    norm = nn.RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 1, 8) * 4
    x[1, 0, 2] = float("nan")
    out = rms_norm_step(norm, x, norm.weight, 1e-6)
    xd = x.double()
    want = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-6) * norm.weight.double()  # independent
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
    torch.testing.assert_close(out[[0, 2]].double(), want[[0, 2]], rtol=1e-5, atol=1e-6)
    assert rms_norm_step(norm, torch.empty(0, 1, 8), norm.weight, 1e-6).shape == (0, 1, 8)
    with torch.no_grad():
        got = rms_norm_step(norm.double(), xd, norm.weight, 1e-6)  # the module's own
        torch.testing.assert_close(got, norm(xd), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError):  # a width the weight does not have: the module's own error
        rms_norm_step(norm, torch.randn(2, 5), norm.weight, 1e-6)


class _BreakLastBlock:
    """The decoding extension's direct calls, with the last block of a stack call handed a state of the wrong shape:
    the call fails inside the compiled code, after the blocks before it ran (and wrote their appended rows)."""

    def __init__(self, calls):
        self._calls = calls

    def __getattr__(self, name: str):
        fn = getattr(self._calls, name)
        if name != "decoder_stack_step":
            return fn

        def broken(x, blocks, *rest):
            last = list(blocks[-1])
            last[4] = torch.zeros(1)  # kv
            return fn(x, [*blocks[:-1], tuple(last)], *rest)

        return broken


@pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")
@pytest.mark.parametrize("which", ["window-linear llama", "linear llama", "linear-lm"])
def test_a_block_failing_inside_the_stack_leaves_every_cache_layer_as_it_was(which, monkeypatch):
    from hf_efficient_kernels import dispatch

    if which == "linear-lm":
        model = _linear_lm()
    else:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
        kind, params = ("window-linear", {"window": 3}) if which.startswith("window") else ("linear", {})
        model = patch_model(LlamaForCausalLM(config).eval(), kind, **params)
    ids = torch.arange(2 * 5).view(2, 5) % 40
    tokens = [torch.full((2, 1), 3 + t) for t in range(4)]
    cache = LinearAttentionCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache)
        model(tokens[0], cache=cache)  # a step of the compiled stack: window buffers of its own, appended in place
        before = [(layer.state, layer.seen_tokens) for layer in cache.layers]
        assert dispatch._decode_cpu_kernel()[0]
        with monkeypatch.context() as patcher:
            patcher.setattr(dispatch, "_DECODE_CALLS", _BreakLastBlock(dispatch._DECODE_CALLS))
            with pytest.raises(RuntimeError, match="kv"):
                model(tokens[1], cache=cache)
        assert [(layer.state, layer.seen_tokens) for layer in cache.layers] == before  # the same objects
        got = torch.cat([model(t, cache=cache).logits for t in tokens[1:]], dim=1)
    monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")
    cache = LinearAttentionCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache)
        model(tokens[0], cache=cache)
        want = torch.cat([model(t, cache=cache).logits for t in tokens[1:]], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")
@pytest.mark.parametrize("head", ["hooked", "plain nn.Linear", "with a bias", "tied"])
def test_linear_lm_heads_hooked_replaced_biased_or_tied_give_the_logits_of_the_modules(head, monkeypatch):
    """A hooked head runs as a module on every step (its hook sees the logits the step returns); a head of another
    class or with a bias, or tied to the embedding, gives the logits of the modules."""
    model = _linear_lm(tied=head == "tied")
    seen = []
    if head == "hooked":
        model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out) or out * 2)
    elif head == "plain nn.Linear":
        plain = nn.Linear(32, 40, bias=False)
        plain.weight = model.lm_head.weight
        model.lm_head = plain
    elif head == "with a bias":
        model.lm_head.bias = nn.Parameter(torch.randn(40))
    got = _decoded(model)
    if head == "hooked":
        assert len(seen) == 1 + 4 and torch.equal(seen[-1] * 2, got[:, -1:])
    monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")
    torch.testing.assert_close(got, _decoded(model), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")
@pytest.mark.parametrize("keep", [0, 1, 3, -1, "tensor"])
def test_linear_lm_logits_to_keep_on_a_decoding_step_is_the_modules(keep, monkeypatch):
    model = _linear_lm()
    keep = torch.tensor([0]) if keep == "tensor" else keep

    def step():
        cache = LinearAttentionCache(config=model.config)
        with torch.no_grad():
            model(torch.arange(2 * 5).view(2, 5) % 40, cache=cache)
            return model(torch.full((2, 1), 7), cache=cache, logits_to_keep=keep).logits

    got = step()
    monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")
    want = step()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _plain_tensor(module: nn.Module, name: str) -> None:
    """Replace the parameter ``name`` of ``module`` by a plain tensor of the same values (as weight tying or
    functional code does): the module still computes with it, and it is no longer in ``_parameters``."""
    value = getattr(module, name).detach().clone()
    delattr(module, name)
    setattr(module, name, value)


@pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")
@pytest.mark.parametrize("model_name", ["linear-lm", "window-linear llama"])
@pytest.mark.parametrize("where", ["head weight", "projection weight", "final norm weight", "head as a wrapper"])
def test_weights_that_are_not_parameters_and_wrapped_heads_decode_as_the_modules(model_name, where, monkeypatch):
    model = _linear_lm() if model_name == "linear-lm" else _window_llama()
    if where == "head weight":
        _plain_tensor(model.lm_head, "weight")
    elif where == "projection weight":
        _plain_tensor(model.model.layers[1].self_attn.v_proj, "weight")
    elif where == "final norm weight":
        _plain_tensor(model.model.norm, "weight")
    else:
        model.lm_head = nn.Sequential(model.lm_head)
    got = _decoded(model)
    monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")
    torch.testing.assert_close(got, _decoded(model), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")
@pytest.mark.parametrize("where", ["linear-lm head", "linear-lm base model", "llama head", "llama projection"])
def test_a_compiled_module_runs_compiled_on_every_decoding_step(where):
    """``Module.compile()`` on a part of the model is the user's choice of how it runs: decoding steps call it (its
    backend sees every step) rather than computing the module themselves."""
    model = _linear_lm() if where.startswith("linear-lm") else _window_llama()
    module = {"linear-lm head": model.lm_head, "linear-lm base model": model.model, "llama head": model.lm_head,
              "llama projection": model.model.layers[0].mlp.down_proj}[where]
    calls = []

    def backend(graph, example_inputs):
        def run(*args):
            calls.append(1)
            return graph.forward(*args)

        return run

    module.compile(backend=backend, dynamic=True)
    _decoded(model)
    assert len(calls) >= 1 + 4  # the prefill and every step


@pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")
def test_a_final_norm_the_kernels_do_not_read_leaves_the_blocks_in_one_call(block_calls, monkeypatch):
    """A final norm whose weight is not laid out as the kernels read it (a strided view) runs after the blocks,
    which still run in one call; the logits are the modules'."""
    model = _window_llama()
    model.model.norm.weight = nn.Parameter(torch.randn(64)[::2])
    got = _decoded(model)
    assert block_calls["stacks"] == 4 and block_calls["n"] == 4 * 2
    monkeypatch.setenv("HF_EFFICIENT_KERNELS", "reference")
    torch.testing.assert_close(got, _decoded(model), rtol=1e-4, atol=1e-4)


def test_linear_lm_grows_a_cache_built_without_a_layer_count_and_names_one_too_short():
    model = _linear_lm()
    ids = torch.arange(5).view(1, 5) + 1
    with torch.no_grad():
        cache = LinearAttentionCache()
        model(ids, cache=cache)
        got = model(torch.tensor([[7]]), cache=cache).logits
        want = model(torch.cat([ids, torch.tensor([[7]])], dim=1)).logits[:, -1:]
        assert len(cache.layers) == 2
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="has 1 layers but the model has 2"):
            model(ids, cache=LinearAttentionCache(1))


@pytest.mark.skipif(load_decode_extension() is None, reason="the CPU decoding kernels cannot be built")
def test_linear_lm_steps_keep_nan_in_its_row_and_refuse_empty_input_leaving_the_cache(block_calls, monkeypatch):
    """linear-lm's one-call step (blocks, norm and head): a NaN embedding spoils only its row, the other row's
    logits stay those of the modules in float64; an input of no tokens or no rows is refused with an error that
    says so, and the cache has not moved."""
    model = _linear_lm()
    torch.manual_seed(3)
    embeds = [torch.randn(2, 1, 32) for _ in range(3)]
    embeds[0][0, 0, 5] = float("nan")
    got = _steps(model, embeds)
    assert block_calls["stacks"] == 3
    with monkeypatch.context() as patcher:
        patcher.setenv("HF_EFFICIENT_KERNELS", "reference")
        want = _steps(copy.deepcopy(model).double(), [e.double() for e in embeds])
    assert torch.isnan(got[0]).all() and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-4, atol=1e-4)
    cache = LinearAttentionCache(config=model.config)
    with torch.no_grad():
        model(torch.arange(2 * 5).view(2, 5) % 40, cache=cache)
        before = [layer.state for layer in cache.layers]
        with pytest.raises(ValueError, match="at least one token per row"):
            model(torch.zeros(2, 0, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="batch 2 but got a batch of 0"):
            model(torch.zeros(0, 1, dtype=torch.long), cache=cache)
    assert [layer.state for layer in cache.layers] == before and cache.get_seq_length() == 5
