"""Tests for nnlib.data.sequences: labels checked by independent Python computation."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nnlib.data.batching import batch_iterator
from nnlib.data.sequences import (
    ADDITION_VOCAB_SIZE,
    BLANK,
    BOS,
    EOS,
    EQUALS,
    GO,
    PAD,
    PLUS,
    addition_task,
    copy_task,
    decode_number,
    encode_number,
    images_as_sequences,
    reverse_task,
    sort_task,
)

# --- images as sequences ---------------------------------------------------------


def test_images_as_sequences_rows_are_time_steps():
    images = np.random.default_rng(0).uniform(size=(3, 5, 4, 2)).astype(np.float32)
    seq = images_as_sequences(images)
    assert seq.shape == (3, 5, 8)
    for i in range(3):
        for t in range(5):  # time step t is image row t, pixels then channels
            assert seq[i, t].tolist() == [float(v) for px in images[i, t] for v in px]
    np.testing.assert_array_equal(np.asarray(images_as_sequences(jnp.asarray(images))), seq)


def test_images_as_sequences_rejects_grayscale_without_channel_axis():
    with pytest.raises(ValueError, match=r"images_as_sequences expected images \[n, height, width, channels\], got shape \(3, 5, 4\); add a channel axis .*images\[\.\.\., None\]"):
        images_as_sequences(np.zeros((3, 5, 4)))
    with pytest.raises(ValueError, match=r"got shape None"):
        images_as_sequences([[1, 2]])


# --- copy / reverse / sort ---------------------------------------------------------

TASKS = {"copy": (copy_task, lambda xs: list(xs)),
         "reverse": (reverse_task, lambda xs: list(reversed(xs))),
         "sort": (sort_task, sorted)}


@pytest.mark.parametrize("kind", sorted(TASKS))
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 6), length=st.integers(1, 9), vocab_size=st.integers(3, 12),
       delay=st.integers(0, 5), seed=st.integers(0, 2**31 - 1))
def test_recall_task_labels_by_independent_computation(kind, n, length, vocab_size, delay, seed):
    make, answer = TASKS[kind]
    task = make(n, length, vocab_size, delay=delay, seed=seed)
    inputs, labels, mask = task["inputs"], task["labels"], task["label_mask"]
    time = 2 * length + delay + 1
    assert inputs.shape == labels.shape == mask.shape == (n, time)
    assert inputs.dtype == labels.dtype == np.int32 and mask.dtype == np.float32
    assert task.vocab_size == vocab_size and task.special_tokens == {"blank": BLANK, "go": GO}
    for i in range(n):
        row, lab, m = inputs[i].tolist(), labels[i].tolist(), mask[i].tolist()
        symbols = row[:length]
        assert all(2 <= s < vocab_size for s in symbols)
        assert row[length:] == [BLANK] * delay + [GO] + [BLANK] * length
        assert lab == [BLANK] * (length + delay + 1) + answer(symbols)
        assert m == [0.0] * (length + delay + 1) + [1.0] * length


def test_recall_tasks_are_deterministic_by_seed():
    a, b = copy_task(8, 5, 10, seed=3), copy_task(8, 5, 10, seed=3)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], copy_task(8, 5, 10, seed=4)["inputs"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n=4, length=3, vocab_size=2), r"copy_task: vocab_size must be an integer >= 3, got 2"),
        (dict(n=4, length=0, vocab_size=5), r"copy_task: length must be an integer >= 1, got 0"),
        (dict(n=True, length=3, vocab_size=5), r"copy_task: n must be an integer >= 1, got True"),
        (dict(n=4, length=3, vocab_size=5, delay=-1), r"copy_task: delay must be an integer >= 0, got -1"),
        (dict(n=4, length=2.5, vocab_size=5), r"copy_task: length must be an integer >= 1, got 2.5"),
    ],
)
def test_copy_task_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        copy_task(**kwargs)


def test_task_arrays_feed_batch_iterator():
    task = sort_task(10, 4, 8, delay=2)
    batch = next(batch_iterator(task.arrays, batch_size=4, seed=0, epoch=0))
    assert batch["inputs"].shape == (4, 11) and batch["label_mask"].shape == (4, 11)
    assert batch["mask"].shape == (4,)  # the per-example mask batch_iterator adds
    assert "SequenceTask(inputs=(10, 11)" in repr(task)


# --- addition -------------------------------------------------------------------------


def _number(tokens):
    """Independent decoding: digit tokens -> Python int via the decimal string."""
    return int("".join(str(t - 5) for t in tokens))


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 5), num_digits=st.integers(1, 18), reverse=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@example(n=8, num_digits=18, reverse=False, seed=0)  # the widest: 19-digit sums
@example(n=8, num_digits=18, reverse=True, seed=1)
def test_addition_prompt_form(n, num_digits, reverse, seed):
    task = addition_task(n, num_digits, reverse_answer=reverse, seed=seed)
    inputs, labels = task["inputs"], task["labels"]
    assert inputs.shape == (n, 2 * num_digits + 2) and labels.shape == (n, num_digits + 1)
    assert task.vocab_size == ADDITION_VOCAB_SIZE == 15
    for row, answer in zip(inputs.tolist(), labels.tolist(), strict=True):
        a, b = _number(row[:num_digits]), _number(row[num_digits + 1:2 * num_digits + 1])
        assert row[num_digits] == PLUS and row[-1] == EQUALS
        assert a < 10**num_digits and b < 10**num_digits
        c = _number(answer[::-1] if reverse else answer)
        assert c == a + b  # Python big-int arithmetic
    np.testing.assert_array_equal(
        decode_number(labels, reverse=reverse),
        [_number(r[:num_digits]) + _number(r[num_digits + 1:-1]) for r in inputs.tolist()])


def test_addition_lm_form_is_the_string_shifted_by_one():
    task = addition_task(6, 3, form="lm", seed=1)
    inputs, labels, mask = task["inputs"], task["labels"], task["label_mask"]
    assert inputs.shape == labels.shape == mask.shape == (6, 11)
    np.testing.assert_array_equal(inputs[:, 1:], labels[:, :-1])
    for row, lab, m in zip(inputs.tolist(), labels.tolist(), mask.tolist(), strict=True):
        s = row + [lab[-1]]  # the whole string a+b=c
        assert s[3] == PLUS and s[7] == EQUALS
        assert _number(s[8:]) == _number(s[:3]) + _number(s[4:7])
        scored = [lab[j] for j in range(len(lab)) if m[j] == 1.0]
        assert scored == s[8:]  # exactly the answer digits are scored


def test_addition_seq2seq_form_has_bos_eos_and_teacher_forcing_shift():
    task = addition_task(5, 4, form="seq2seq", seed=2)
    src, dec, lab = task["inputs"], task["decoder_inputs"], task["labels"]
    assert src.shape == (5, 9) and dec.shape == lab.shape == (5, 6)
    assert np.all(dec[:, 0] == BOS) and np.all(lab[:, -1] == EOS)
    np.testing.assert_array_equal(dec[:, 1:], lab[:, :-1])
    for s, y in zip(src.tolist(), lab.tolist(), strict=True):
        assert s[4] == PLUS and _number(y[:-1]) == _number(s[:4]) + _number(s[5:])
    np.testing.assert_array_equal(decode_number(dec), decode_number(lab))  # BOS/EOS skipped
    assert task.special_tokens["bos"] == BOS and task.special_tokens["pad"] == PAD


def test_decode_number_handles_specials_and_reports_bad_tokens():
    d = lambda *digits: [5 + x for x in digits]
    tokens = np.array([[BOS, *d(0, 4, 2), EOS, *d(9)],   # stops at EOS -> 42
                       [PAD, PAD, *d(7), EOS, PAD, PAD],  # -> 7
                       [EOS, *d(1, 2, 3), PAD, PAD]])     # nothing before EOS -> -1
    assert decode_number(tokens).tolist() == [42, 7, -1]
    assert decode_number(np.array(d(3, 2, 1)), reverse=True) == 123
    assert decode_number(encode_number(np.array([0, 5, 1234]), 6)).tolist() == [0, 5, 1234]
    with pytest.raises(ValueError, match=r"decode_number: expected digit tokens 5\.\.14 .*got token 3 at index \(0, 1\)"):
        decode_number(np.array([d(1) + [PLUS] + d(2)]))
    with pytest.raises(ValueError, match=r"decode_number: at most 19 digits fit int64, got 20"):
        decode_number(np.full((1, 20), 6))
    with pytest.raises(ValueError, match=r"decode_number: the number 9999999999999999999 does not fit int64"):
        decode_number(np.full((1, 19), 14))
    big = [5 + int(ch) for ch in str(2**63 - 1)]  # the largest int64 still decodes
    assert decode_number(np.array(big)) == 2**63 - 1
    with pytest.raises(ValueError, match=r"decode_number expected integer tokens \[\.\.\., width\], got shape \(2,\) dtype float64"):
        decode_number(np.zeros(2))


def test_encode_number_layout_and_errors():
    assert encode_number(np.array([7, 305]), 4).tolist() == [[5, 5, 5, 12], [5, 8, 5, 10]]
    assert encode_number(np.array([305]), 4, reverse=True).tolist() == [[10, 5, 8, 5]]
    with pytest.raises(ValueError, match=r"encode_number: values must be in \[0, 10\*\*2\) to fit 2 digits, got range \[3, 100\]"):
        encode_number(np.array([3, 100]), 2)
    with pytest.raises(ValueError, match=r"encode_number: width must be an integer in \[1, 19\], got 0"):
        encode_number(np.array([3]), 0)


def test_addition_errors():
    with pytest.raises(ValueError, match=r"addition_task: form must be one of \('prompt', 'lm', 'seq2seq'\), got 'chat'"):
        addition_task(2, 2, form="chat")
    with pytest.raises(ValueError, match=r"addition_task: num_digits must be an integer in \[1, 18\], got 19"):
        addition_task(2, 19)
