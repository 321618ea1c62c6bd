"""lowbit's maskless causal SDPA (lowbit.models.attention): the same logits as transformers' `sdpa` bit for bit, no
mask building (the per-forward host synchronisation), padding masks refused, other implementations left alone."""
import pytest
import torch
import transformers.masking_utils as masking_utils
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.models.attention import CAUSAL_SDPA, restore_sdpa, use_causal_sdpa


def tiny_llama(attention: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = attention
    config.use_cache = False        # as the trainer's models (a cache also skips transformers' packed-sequence check)
    return LlamaForCausalLM(config).eval()


def test_causal_sdpa_gives_sdpa_logits_without_building_a_mask(monkeypatch):
    model = tiny_llama()
    x = torch.randint(0, 96, (2, 21))
    calls = []
    find = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda *a, **k: calls.append(1) or find(*a, **k))
    want = model(input_ids=x).logits
    assert calls, "transformers no longer checks for packed sequences: this module may be unnecessary"
    calls.clear()
    assert use_causal_sdpa(model) and model.config._attn_implementation == CAUSAL_SDPA
    got = model(input_ids=x).logits
    assert torch.equal(got, want) and not calls
    # and the causal mask is real: a changed last token leaves every earlier position's logits alone
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 96
    assert torch.equal(model(input_ids=changed).logits[:, :-1], got[:, :-1])
    restore_sdpa(model)
    assert model.config._attn_implementation == "sdpa" and torch.equal(model(input_ids=x).logits, want)


def test_padding_masks_are_refused_and_other_attention_kept():
    model = tiny_llama()
    use_causal_sdpa(model)
    x = torch.randint(0, 96, (2, 8))
    for call in (lambda: model(input_ids=x, attention_mask=torch.ones_like(x)), lambda: model(x, torch.ones_like(x))):
        with pytest.raises(ValueError, match="attention_mask passed; call lowbit.models.attention.restore_sdpa"):
            call()
    eager = tiny_llama("eager")
    assert not use_causal_sdpa(eager) and eager.config._attn_implementation == "eager"
