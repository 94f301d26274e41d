# T5's span corruption on a CPU in minutes: the t5-tiny encoder-decoder (4 + 4 blocks, 128 wide, relative
# position bias, 1.9M parameters) on the built-in pystdlib corpus (bytes; prepared on first use). Each row
# is a window of 141 bytes: 15% of it, in spans of 3 on average, is cut out, and the encoder reads the rest
# with a sentinel in each hole (128 tokens). The decoder writes the whole window back (142 tokens with EOS;
# span_targets='whole': the original text as target, as in BART's text infilling) rather than T5's sentinels
# and the bytes they hid (29): it must copy what the encoder reads as well as fill the holes, so pretraining
# teaches it to read the encoder. With T5's targets it barely did (the validation loss rose by 0.07 nats/token
# when the encoder read another window; 0.93 with these), and fine-tuning from it lost to fine-tuning from
# scratch (docs/t5.md).
#   python train.py config/t5_span.py
#   python train.py config/t5_seq2seq.py          # then fine-tune it on a demo task
#   python train.py config/t5_docstrings.py
#   python finetune_grid.py --task=params,docstrings --workers=2   # pretrained vs scratch, 1/10/100% of the pairs
out_dir = "out-t5-span"
objective = "span"
span_targets = "whole"
dataset = "pystdlib"
tokenizer = "bytes"
model = "t5-tiny"
seq_len = 128               # the encoder's input; the raw window (141) and the decoder's length (142) follow
batch_size = 16
max_iters = 2000
optimizer = "auto"          # Muon on the blocks' matrices at muon_lr 0.01, AdamW on the rest (AdamW before torch 2.9)
lr_schedule = "wsd"         # the decoder learned to copy in the decay (the last 400 steps)
learning_rate = 2e-3
min_lr = 0.0
warmup_iters = 100
eval_interval = 500
eval_iters = 16             # 16 x 16 fixed validation windows
log_interval = 100
