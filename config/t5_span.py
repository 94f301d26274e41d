# T5's span corruption on a CPU in minutes: the t5-tiny encoder-decoder (4 + 4 blocks, 128 wide, relative
# position bias, 1.9M parameters) on the built-in pystdlib corpus (bytes; prepared on first use). Each row
# is a window of 141 bytes: 15% of it, in spans of 3 on average, is cut out; the encoder reads the rest
# with a sentinel in each hole (128 tokens), the decoder writes each sentinel and the bytes it hid (29).
#   python train.py config/t5_span.py
#   python train.py config/t5_seq2seq.py          # then fine-tune it on the demo task
out_dir = "out-t5-span"
objective = "span"
dataset = "pystdlib"
tokenizer = "bytes"
model = "t5-tiny"
seq_len = 128               # the encoder's input; the raw window (141) and the decoder's length follow
batch_size = 16
max_iters = 2000
optimizer = "adamw"          # tuned with AdamW and a cosine (train.py's defaults: Muon + WSD, for the quickstart)
lr_schedule = "cosine"
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
eval_interval = 500
eval_iters = 16             # 16 x 16 fixed validation windows
log_interval = 100
