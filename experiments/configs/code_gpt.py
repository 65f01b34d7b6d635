"""Character GPT on Python source code: the standard library's own ``.py`` files.

The model and budget of ``shakespeare_char_gpt`` (4 layers, 4 heads, width
128, context 64; 2500 steps of 12 windows) on the first 2M characters of the
running Python's standard library (``nnlib.data.python_stdlib_corpus``:
nothing to download). After training, 300 characters sampled after the
prompt ``"def "`` go to ``workdir/samples.txt``: indented blocks, ``self.``
attributes, colons and docstrings should be recognisable. Target: the
samples look like Python, and the validation loss is reported (code is more
repetitive than verse, so it is lower than Shakespeare's).

Measured (2-core CPU under other jobs' load): validation loss 1.703 after
2,500 steps (813,824 parameters); a sample begins ``def _executoral():`` and
goes on with ``self._part_filer = _marg_format(f)``, a ``def`` with ``self,
loop`` and a docstring holding ``>>>``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "python_code_char"
    c.max_chars = 2_000_000
    c.model = ml_collections.ConfigDict(
        {"name": "gpt", "context_length": 64, "num_layers": 4, "num_heads": 4,
         "embed_dim": 128, "dropout_rate": 0.0})
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
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
    c.sample_chars = 300
    c.sample_prompt = "def "
    c.sample_temperature = 0.8
    c.seed = 0
    return c
