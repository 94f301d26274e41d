# What `python train.py` with no arguments does, spelled out: the tiny LLaMA-style model on the
# built-in pystdlib corpus (bytes), prepared on first use. About 8 minutes on a 2-core CPU.
out_dir = "out"
dataset = "pystdlib"
tokenizer = "bytes"
model = "tiny"
batch_size = 32
block_size = 256
max_iters = 2000
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 100
eval_interval = 250
eval_iters = 16
device = "auto"
