# What `python train.py` with no arguments does, spelled out: the tiny LLaMA-style model on the
# built-in pystdlib corpus (bytes), prepared on first use. 4 to 8 minutes on a 2-core CPU.
# Chosen by a sweep at equal compute (2M tokens): batch 8 beat 16 and 32 (val 1.31 vs 1.32 vs 1.48),
# learning rate 3e-3 beat 1e-2, 4x128 beat 2x256 and 4x192, weight decay 0.1/beta2 0.95 beat 0/0.99.
# Then at equal wall time (docs/quickstart.md): Muon (lr 0.01) for the blocks' matrices and
# a WSD schedule beat AdamW + cosine; 2200 steps reach val 0.965 in 4 to 8 minutes (README, "Measured").
out_dir = "out"
dataset = "pystdlib"
tokenizer = "bytes"
model = "tiny"
batch_size = 8
block_size = 256
max_iters = 2200
optimizer = "auto"          # Muon; AdamW under FSDP or before torch 2.9 (train.py optimizer_of)
muon_lr = 0.01
learning_rate = 3e-3        # AdamW's: the embedding (tied head) and the norms
lr_schedule = "wsd"
decay_frac = 0.2
min_lr = 0.0
warmup_iters = 100
eval_interval = 250
eval_iters = 32
device = "auto"
