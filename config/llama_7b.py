# LLaMA-2-7B from scratch: FSDP2 over 8 GPUs x N nodes, bf16 compute with fp32 master weights,
# full activation checkpointing, sequence 4096, ~4M tokens per optimizer step.
#
# The tokenizer is LLaMA-2's own (SentencePiece BPE, 32,000 ids: the preset's vocab_size, so the model is
# exactly LLaMA-2-7B's shape and exports to a folder that transformers and lm-eval use as is), as a
# Hugging Face tokenizer.json; TinyLlama publishes it without a licence gate. Corpus: FineWeb-Edu.
#   pip install tokenizers datasets huggingface_hub
#   python -c "from huggingface_hub import hf_hub_download as get; [get('TinyLlama/TinyLlama-1.1B-Chat-v1.0', f, \
#              local_dir='tok-llama2') for f in ('tokenizer.json', 'tokenizer_config.json')]"
#   python prepare.py --name=fineweb_edu_llama2 --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-100BT \
#                     --tokenizer=tok-llama2/tokenizer.json --val_docs=10000
#   # on every node (N nodes, node_rank 0..N-1, MASTER = node 0's address):
#   torchrun --nnodes=N --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \
#            --rdzv_endpoint=$MASTER:29500 --rdzv_id=llama7b train.py config/llama_7b.py
#   # SLURM: see README.md (srun launches one torchrun per node)
# A corpus with another tokenizer stops the run before any compute when its ids do not fit 32,000; drop
# vocab_size below to take the tokenizer's vocabulary instead (with pad_vocab_to = 128), at a new size.
#
# Global batch = batch_size x block_size x gradient_accumulation_steps x (8 * N) sequences-tokens:
# 2 x 4096 x 8 x 64 GPUs = 4.19M tokens. For N nodes keep gradient_accumulation_steps = 64 // N.
# Estimated memory per GPU at 64 GPUs (python bench.py --estimate llama-7b --gpus 64 --parallel fsdp
# --batch_size=2 --block_size=4096): 11.3 GiB with full activation checkpointing, 61.2 GiB without.
out_dir = "out-llama-7b"
dataset = "fineweb_edu_llama2"
model = "llama-7b"
vocab_size = 32000          # LLaMA-2's tokenizer: ids 0..31999, </s> (2) ends each document
block_size = 4096
batch_size = 2              # sequences per GPU per micro-step
gradient_accumulation_steps = 8
parallel = "fsdp"
dtype = "bfloat16"
compile = True
activation_checkpointing = "full"
optimizer = "adamw"          # tuned with AdamW and a cosine (train.py's defaults: Muon + WSD, for the quickstart)
lr_schedule = "cosine"
learning_rate = 3e-4        # LLaMA-2: peak 3e-4, cosine to 10%, 2000 warmup steps, wd 0.1, beta2 0.95, clip 1.0
min_lr = 3e-5
warmup_iters = 2000
max_iters = 500000
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0
eval_interval = 1000
eval_iters = 50
log_interval = 10
checkpoint_interval = 500
checkpoint_every_minutes = 30.0
keep_last = 3
dist_timeout_minutes = 30   # a checkpoint save of a 7B model can keep ranks waiting for minutes
