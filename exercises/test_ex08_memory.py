"""Grader for ex08_memory.py (notebook 08): compared with minilora.memory (lora_trainable_params, nf4_tensor_bytes,
estimate, activation_bytes)."""
from grading import GRADE, check_value
from hypothesis import example, given
from hypothesis import strategies as st

from minilora.memory import ModelShape, activation_bytes, estimate, lora_trainable_params, nf4_tensor_bytes

EXERCISE = "ex08_memory"
NAMES = ("q", "k", "v", "o", "gate", "up", "down")


def llama(n_layer, d_model, d_ff, n_head=1):
    return ModelShape("student-check", n_layer, d_model, n_head, d_ff, vocab_size=32000)


@GRADE
@given(n_layer=st.integers(1, 80), d_model=st.integers(1, 8192), d_ff=st.integers(1, 30000), r=st.integers(1, 256),
       targets=st.sets(st.sampled_from(NAMES), min_size=1))
@example(n_layer=32, d_model=4096, d_ff=11008, r=8, targets={"q", "v"})          # LLaMA-7B, PEFT's default
@example(n_layer=32, d_model=4096, d_ff=11008, r=64, targets=set(NAMES))         # QLoRA: all linear layers
@example(n_layer=2, d_model=16, d_ff=48, r=4, targets={"down"})
def test_lora_model_params(ex, n_layer, d_model, d_ff, r, targets):
    t = [n for n in NAMES if n in targets]
    expected = lora_trainable_params(llama(n_layer, d_model, d_ff), r, ",".join(t))
    check_value("lora_model_params(n_layer, d_model, d_ff, r, targets)", ex.lora_model_params(n_layer, d_model, d_ff,
                r, tuple(t)), expected, {"n_layer": n_layer, "d_model": d_model, "d_ff": d_ff, "r": r, "targets": t})


@GRADE
@given(n=st.integers(1, 10**10), blocksize=st.sampled_from([64, 128, 256, 4096]), double_quant=st.booleans(),
       nested_blocksize=st.sampled_from([256, 512]))
@example(n=4096 * 4096, blocksize=64, double_quant=True, nested_blocksize=256)
@example(n=4097, blocksize=64, double_quant=True, nested_blocksize=256)                # odd n, partial blocks
@example(n=4097, blocksize=64, double_quant=False, nested_blocksize=256)
def test_nf4_tensor_bytes(ex, n, blocksize, double_quant, nested_blocksize):
    expected = sum(nf4_tensor_bytes(n, blocksize, double_quant, nested_blocksize).values())
    check_value("nf4_tensor_bytes(n, blocksize, double_quant, nested_blocksize)",
                ex.nf4_tensor_bytes(n, blocksize, double_quant, nested_blocksize), expected,
                {"n": n, "blocksize": blocksize, "double_quant": double_quant, "nested_blocksize": nested_blocksize})


@GRADE
@given(r=st.integers(1, 128), targets=st.sets(st.sampled_from(NAMES), min_size=1),
       bytes_per_value=st.sampled_from([2, 4]))
@example(r=8, targets={"q", "v"}, bytes_per_value=4)
@example(r=64, targets=set(NAMES), bytes_per_value=4)
def test_adamw_state_bytes(ex, r, targets, bytes_per_value):
    t = ",".join(n for n in NAMES if n in targets)
    est = estimate("llama-7b", "lora", r=r, targets=t, include_activations=False, optimizer_state_bytes=bytes_per_value)
    n = est.trainable_params
    check_value("adamw_state_bytes(n_trainable, bytes_per_value)", ex.adamw_state_bytes(n, bytes_per_value),
                est.breakdown["optimizer_states"], {"n_trainable": n, "bytes_per_value": bytes_per_value})


@GRADE
@given(seq_len=st.integers(1, 8192), batch_size=st.integers(1, 64), d_model=st.integers(1, 16384),
       n_head=st.integers(1, 128), bytes_per_value=st.sampled_from([2, 4]), dropout=st.booleans())
@example(seq_len=512, batch_size=1, d_model=4096, n_head=32, bytes_per_value=2, dropout=True)
@example(seq_len=128, batch_size=4, d_model=64, n_head=4, bytes_per_value=4, dropout=False)
def test_activation_bytes_per_block(ex, seq_len, batch_size, d_model, n_head, bytes_per_value, dropout):
    d_model = max(n_head, d_model - d_model % n_head)          # every head gets d_model / n_head dimensions
    shape = ModelShape("student-check", 1, d_model, n_head, 4 * d_model, 1000)
    expected = activation_bytes(shape, seq_len, batch_size, False, bytes_per_value, dropout)["per_block"]
    check_value("activation_bytes_per_block(seq_len, batch_size, d_model, n_head, bytes_per_value, dropout)",
                ex.activation_bytes_per_block(seq_len, batch_size, d_model, n_head, bytes_per_value, dropout), expected,
                {"seq_len": seq_len, "batch_size": batch_size, "d_model": d_model, "n_head": n_head,
                 "bytes_per_value": bytes_per_value, "dropout": dropout})
