"""Character LSTM on Tiny Shakespeare, the same budget as ``shakespeare_char_gpt``.

An embedding of 64, two LSTM layers of 256 and a linear head: 874,881
parameters for the 65-character vocabulary, close to the GPT's ~0.8M. Data,
context (64), batch (12), steps (2500), optimizer and schedule are the GPT's,
so the two validation losses compare the architectures; only the peak
learning rate differs (2e-3 here, a common Adam rate for LSTMs; 1e-3 for the
GPT, nanoGPT's). Target: report the validation loss next to the GPT's (<= 1.90);
no threshold of its own. Measured on a quiet 2-core CPU: validation loss
1.621 (perplexity 5.06) after 177 s of training, 14.3 steps/s (367 s, 6.8
steps/s, on a loaded machine before ``RNN``'s features-first recurrence).

The corpus path comes from ``--config.data_path`` or the environment variable
``NNLIB_TINYSHAKESPEARE``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "shakespeare_char"
    c.data_path = ""
    # context_length sets the training window; an RNN has no positional limit.
    c.model = ml_collections.ConfigDict(
        {"name": "rnn_lm", "context_length": 64, "embed_dim": 64, "hidden_size": 256,
         "num_layers": 2, "cell": "lstm", "dropout_rate": 0.0})
    c.optimizer = "adamw"
    c.learning_rate = 2e-3
    c.schedule = "warmup_cosine"
    c.warmup_steps = 100
    c.end_learning_rate = 1e-4
    c.weight_decay = 0.1
    c.clip_norm = 1.0
    c.batch_size = 12
    c.num_epochs = 0
    c.num_steps = 2500
    c.train_stride = 1
    c.max_val_windows = 2048
    c.eval_batch_size = 256
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint_every = 1000
    c.seed = 0
    return c
