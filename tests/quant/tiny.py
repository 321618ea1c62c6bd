"""A tiny random Llama for quantization tests (vocab 256, hidden 64, MLP 96: a partial group at g64)."""
import torch


def tiny_llama(seed: int = 0, vocab_size: int = 256, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
