# LLaMA-2-7B from scratch: FSDP2 over 8 GPUs x N nodes, bf16 compute with fp32 master weights,
# full activation checkpointing, sequence 4096, ~4M tokens per optimizer step.
#
#   python prepare.py --name=mycorpus --input=shards/*.jsonl --tokenizer=cl100k_base   # or your tokenizer
#   # on every node (N nodes, node_rank 0..N-1, MASTER = node 0's address):
#   torchrun --nnodes=N --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \
#            --rdzv_endpoint=$MASTER:29500 --rdzv_id=llama7b train.py config/llama_7b.py
#   # SLURM: see README.md (srun launches one torchrun per node)
#
# Global batch = batch_size x block_size x gradient_accumulation_steps x (8 * N) sequences-tokens:
# 2 x 4096 x 8 x 64 GPUs = 4.19M tokens. For N nodes keep gradient_accumulation_steps = 64 // N.
# Estimated memory per GPU at 64 GPUs (python bench.py --estimate llama-7b --gpus 64 --parallel fsdp
# --batch_size=2 --block_size=4096): 11.3 GiB with full activation checkpointing, 61.2 GiB without.
out_dir = "out-llama-7b"
dataset = "mycorpus"
model = "llama-7b"
vocab_size = 32000          # the preset's; set it to your tokenizer's vocabulary (rounded up to a multiple of 64)
block_size = 4096
batch_size = 2              # sequences per GPU per micro-step
gradient_accumulation_steps = 8
parallel = "fsdp"
dtype = "bfloat16"
compile = True
activation_checkpointing = "full"
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
