cd /work/main
for v in base head; do
  extra=""
  [ $v = head ] && extra="precision.include=[*.layers.*,lm_head] precision.exclude=[*embed*]"
  /usr/bin/time -f "%e s" .venv/bin/python train.py +exp=fp8_llama model=llama_tiny data.seq_len=128 trainer.global_batch_size=16 trainer.micro_batch_size=8 trainer.max_steps=150 trainer.eval_every=50 trainer.eval_batches=8 logger.backends=[jsonl] model.compile=false trainer.save_every=-1 trainer.export=false run_dir=/tmp/head_cpu_$v $extra > /tmp/head_cpu_$v.log 2>&1
done
echo done > /tmp/head_cpu.done
