"""Teacher-generated data: prompts cut from the corpus, continued by the teacher, cached by settings."""
import gzip
import json

from lowbit.quant.teacher_data import cache_path, generate_teacher_data, sample_prompts


def test_generates_continuations_of_corpus_prompts_and_caches_them(tmp_path):
    from lowbit.eval.quant_table import load_model

    model, tokenizer = load_model("llama_tiny")
    documents = ["Shall I compare thee to a summer's day? Thou art more lovely and more temperate." * 2,
                 "short", "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date."]
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(documents))
    path = cache_path(tmp_path / "cache", "llama_tiny", source, {"samples": 5})
    assert path == cache_path(tmp_path / "cache", "llama_tiny", source, {"samples": 5})
    assert path != cache_path(tmp_path / "cache", "llama_tiny", source, {"samples": 6})
    prompts = sample_prompts(documents, tokenizer, 5, 8, seed=0)
    generate_teacher_data(model, tokenizer, documents, path, samples=5, prompt_tokens=8, new_tokens=6, batch_size=2)
    with gzip.open(path, "rt") as lines:
        texts = [json.loads(line)["text"] for line in lines]
    assert len(texts) == 5
    for prompt, text in zip(prompts, texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert text.startswith(tokenizer.decode(prompt)) and len(ids) > len(prompt)
    stamp = path.stat().st_mtime_ns
    generate_teacher_data(model, tokenizer, documents, path, samples=5, prompt_tokens=8, new_tokens=6)
    assert path.stat().st_mtime_ns == stamp                           # cached: not regenerated
