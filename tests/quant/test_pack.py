"""Packed low-bit export: bit layout, and the round trip reproduces the fake-quantized model's logits exactly."""
import pytest
import torch

from lowbit.quant.fake_quant import FORMATS, make_format
from lowbit.quant.linear import FakeQuantLinear, attach_fake_quant
from lowbit.quant.pack import export_packed, load_packed, pack_codes, unpack_codes
from tests.quant.tiny import tiny_llama


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_unpack_round_trip_and_size(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (1003,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 126 * bits      # ceil(1003 / 8) * bits bytes
    assert torch.equal(unpack_codes(packed, bits, 1003), codes)


def test_bit_layout_is_little_endian_within_each_8_code_word():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack_codes(codes, 3).tolist() == [word & 255, (word >> 8) & 255, (word >> 16) & 255]
    assert pack_codes(torch.tensor([1, 15], dtype=torch.uint8), 4).tolist()[:1] == [1 | 15 << 4]
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        pack_codes(torch.tensor([4], dtype=torch.uint8), 2)


@pytest.mark.parametrize("name,group_size,learnable", [(n, 64, False) for n in FORMATS] + [("int3", 32, True),
                                                                                            ("fp4_afpq", 32, True)])
def test_export_round_trip_reproduces_fake_quant_logits_exactly(tmp_path, name, group_size, learnable):
    model = tiny_llama()
    attach_fake_quant(model, make_format(name, group_size, partial_groups=True), ["*.layers.*"], ["*lm_head*"],
                      learnable_clip=learnable)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, FakeQuantLinear):
                layer.set_clip_ratio(torch.rand_like(layer.clip_ratio) * 0.4 + 0.6)
                if learnable:
                    layer.clip_hi.mul_(0.95)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    path = export_packed(model, tmp_path / "q.safetensors")
    reloaded = load_packed(path)                       # rebuilt from the stored HF config
    assert not any(isinstance(m, FakeQuantLinear) for m in reloaded.modules())
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, expected)
    bits = make_format(name, group_size).bits
    packed_bytes = sum(t.numel() for k, t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(path).items()
                       if k.endswith(".qweight"))
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, FakeQuantLinear))
    assert packed_bytes == pytest.approx(linear_weights * bits / 8, rel=0.01)


def test_loading_into_a_different_architecture_fails_clearly(tmp_path):
    model = tiny_llama()
    attach_fake_quant(model, make_format("int4", 32), ["*.layers.*"], [])
    path = export_packed(model, tmp_path / "q.safetensors")
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_packed(path, other)
