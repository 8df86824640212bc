"""The "numpy-strict" backend: it refuses what CuPy refuses, and minilora's results stay on its "device".

The xp fixture already runs every array test of quant/, nn/, optim/ and peft/ on it. This file proves the backend
itself fails where CuPy would (a host lookup table taken with device indices above all), then runs the paths the
fixture does not reach end to end on it (QLoRA step, paged optimizer, training loop with resume, adapter files,
memory report, the quick demo), asserting that every result is still a strict array and equals the NumPy run.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from minilora import backend
from minilora.backend import StrictArray, strict, to_numpy, use_backend

TINY = dict(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=32)


# ------------------------------------------------------------------------------------------- what it refuses
def test_take_of_a_host_lookup_table_with_device_indices_raises():
    lut = np.arange(256, dtype=np.float32) / 255            # a host table, e.g. a code book cached with numpy
    idx = strict.asarray([3, 1, 250])                        # device indices
    assert np.array_equal(np.take(lut, to_numpy(idx)), lut[[3, 1, 250]])   # plain NumPy computes it silently
    with pytest.raises(TypeError, match="take: a host numpy.ndarray float32"):
        strict.take(lut, idx)
    with pytest.raises(TypeError, match="take"):
        np.take(lut, idx, out=strict.empty(3, dtype=strict.float32))
    np.testing.assert_array_equal(to_numpy(strict.take(strict.asarray(lut), idx)), lut[[3, 1, 250]])   # the fix


def test_ufuncs_functions_and_stores_refuse_host_arrays_and_name_the_operation():
    x = strict.arange(4, dtype=strict.float32)
    host = np.ones(4, np.float32)
    mixes = {"add": lambda: x + host, "multiply": lambda: host * x, "matmul": lambda: x @ host,
             "concatenate": lambda: strict.concatenate([x, host]), "where": lambda: strict.where(x > 1, x, host),
             "copyto": lambda: strict.copyto(x, host), "__setitem__": lambda: x.__setitem__(slice(None), host),
             "sqrt": lambda: strict.sqrt(x, out=host), "subtract": lambda: strict.subtract(host, host)}
    mixes["linalg.solve"] = lambda: strict.linalg.solve(strict.eye(4), host)          # xp.linalg, as cupy.linalg
    for op, call in mixes.items():
        with pytest.raises(TypeError, match=op):
            call()
    u, s, vh = strict.linalg.svd(strict.eye(3) * 2)                   # results stay on the device, namedtuple kept
    assert all(isinstance(a, StrictArray) for a in (u, s, vh)) and to_numpy(s).tolist() == [2, 2, 2]
    with pytest.raises(AttributeError, match="not wrapped"):
        _ = strict.fft                                                 # other submodules are refused by name
    # scalars, NumPy scalars, 0-d host arrays and host indices are fine (CuPy takes them too)
    y = x + 1 + np.float32(2) + np.array(3.0, np.float32)
    assert isinstance(y, StrictArray) and to_numpy(y).tolist() == [6, 7, 8, 9]
    assert to_numpy(x[np.array([3, 0])]).tolist() == [3, 0]
    x[np.array([0])] = 5
    assert to_numpy(x).tolist() == [5, 1, 2, 3]


def test_cupy_rules_take_mode_ufunc_methods_sort_kind():
    x = strict.arange(6, dtype=strict.float32)
    with pytest.raises(TypeError, match="mode"):
        strict.take(x, strict.asarray([0]), mode="wrap")     # cupy.take has no mode ...
    assert to_numpy(strict.take(x, strict.asarray([7, -1]))).tolist() == [1, 5]   # ... out-of-range indices wrap
    with pytest.raises(NotImplementedError, match="maximum.reduceat"):
        strict.maximum.reduceat(x, strict.asarray([0, 3]))
    with pytest.raises(NotImplementedError, match="maximum.reduce"):
        strict.maximum.reduce(x)                             # x.max() is fine: CuPy's ndarray has max()
    assert float(x.max()) == 5
    with pytest.raises(TypeError, match="scatter add"):
        strict.add.at(strict.zeros(3, dtype=strict.int64), strict.asarray([0]), 1)
    acc = strict.zeros(3, dtype=strict.float32)
    strict.add.at(acc, strict.asarray([0, 0, 2]), strict.float32(1))
    assert to_numpy(acc).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="stable"):
        strict.argsort(x, kind="quicksort")
    with pytest.raises(TypeError, match="list"):
        strict.maximum(x, [1, 2, 3, 4, 5, 6])


def test_results_are_strict_arrays_and_to_numpy_is_a_copy():
    x = strict.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    for r in (x.T, x.astype(strict.float64), x.reshape(-1), x.sum(), x.max(axis=1), x[1, 2], x.argmax(), x[0] * 2,
              strict.sort(x), x.nonzero()[0], strict.unravel_index(strict.asarray(4), (2, 3))[0]):
        assert isinstance(r, StrictArray), r                 # reductions and scalar indexing: 0-d, as in CuPy
    h = to_numpy(x)
    assert type(h) is np.ndarray
    h[0, 0] = 99
    assert float(x[0, 0]) == 0                               # a copy, as CuPy's .get() is


def test_selected_like_the_others_and_seeds_reproduce_numpy():
    with use_backend("numpy-strict") as xp:
        assert xp is strict and backend.get_backend() == "numpy-strict" and xp.__name__ == "numpy_strict"
        a = backend.default_rng(7).standard_normal(5)
        assert backend.get_array_module(a) is strict and isinstance(backend.asarray([1, 2]), StrictArray)
    assert backend.get_backend() == "numpy"
    np.testing.assert_array_equal(to_numpy(a), np.random.default_rng(7).standard_normal(5))
    env = dict(os.environ, MINILORA_BACKEND="numpy-strict")
    r = subprocess.run([sys.executable, "-c", "import minilora; print(minilora.get_backend())"], env=env,
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "numpy-strict"


# --------------------------------------------------------------------------------- results stay on the device
def _strict_tree(arrays):
    bad = [k for k, v in arrays.items() if not isinstance(v, StrictArray)]
    assert not bad, f"left the device: {bad}"


def test_a_code_table_follows_the_data_as_bitsandbytes_moves_it_to_the_input_device(monkeypatch):
    """A table made on the device, given with host data, is copied to the host with to_numpy; a host table with
    device data goes in. Same bytes either way. numpy.asarray(device) is made to raise here, as CuPy's implicit
    conversion does: the strict backend alone cannot see it (docs/backends.md, "What it cannot see")."""
    from minilora.quant import create_dynamic_map, quantize_blockwise
    real_asarray = np.asarray

    def asarray_as_on_cupy(a, *args, **kwargs):
        if isinstance(a, StrictArray):
            raise TypeError("Implicit conversion to a NumPy array is not allowed")
        return real_asarray(a, *args, **kwargs)
    monkeypatch.setattr(np, "asarray", asarray_as_on_cupy)
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    host_code = create_dynamic_map()
    with use_backend("numpy-strict"):
        dev_code = create_dynamic_map()
    assert isinstance(dev_code, StrictArray) and not isinstance(host_code, StrictArray)
    q_host, st_host = quantize_blockwise(x, code=dev_code)
    q_dev, st_dev = quantize_blockwise(strict.asarray(x), code=host_code)
    assert type(q_host) is np.ndarray and type(st_host.code) is np.ndarray
    assert isinstance(q_dev, StrictArray) and isinstance(st_dev.code, StrictArray)
    np.testing.assert_array_equal(to_numpy(q_dev), q_host)


def test_quantization_round_trip_stays_on_the_device_and_matches_numpy():
    from minilora.quant import dequantize_4bit, dequantize_blockwise, quantize_4bit, quantize_blockwise
    x = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    p_np, s_np = quantize_4bit(x, blocksize=64, compress_statistics=True)
    p, s = quantize_4bit(strict.asarray(x), blocksize=64, compress_statistics=True)
    y = dequantize_4bit(p, s)
    _strict_tree({"packed": p, "absmax": s.absmax, "code": s.code, "offset": s.offset, "absmax2": s.state2.absmax,
                  "dequantized": y})
    assert np.array_equal(to_numpy(p), p_np) and np.array_equal(to_numpy(y), dequantize_4bit(p_np, s_np))
    q, s8 = quantize_blockwise(strict.asarray(x), blocksize=256)
    _strict_tree({"codes": q, "absmax": s8.absmax, "dequantized": dequantize_blockwise(q, s8)})
    assert np.array_equal(to_numpy(q), quantize_blockwise(x, blocksize=256)[0])


def _qlora_step(name, paged_budget=None):
    """A QLoRA GPT (NF4 + DQ, LoRA on every linear), one forward, backward and (paged) AdamW step on `name`."""
    from minilora.nn import GPT, GPTConfig
    from minilora.optim import AdamW
    from minilora.optim.paged import PagedAdamW, PagedPool
    from minilora.peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training, quantize_model
    with use_backend(name) as xp:
        cfg = GPTConfig(**TINY)
        model = get_peft_model(prepare_model_for_kbit_training(quantize_model(GPT(cfg), compress_statistics=True)),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        if paged_budget is None:
            opt = AdamW(model.named_parameters(), lr=1e-2)
        else:
            pool = PagedPool(budget_bytes=paged_budget, page_size=256, paged_threshold=0)
            opt = PagedAdamW(model.named_parameters(), lr=1e-2, pool=pool)
        batch = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 2, cfg.block_size))
        for _ in range(2):
            model(xp.asarray(batch[0]), xp.asarray(batch[1]))
            model.backward()
            opt.step()
            if paged_budget is not None:
                pool.evict_all()
        return model, opt


def test_parameters_gradients_and_optimizer_states_stay_on_the_device():
    model, opt = _qlora_step("numpy-strict")
    ref, _ = _qlora_step("numpy")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    _strict_tree({n: p.data for n, p in model.named_parameters()})
    _strict_tree({n: p.grad for n, p in trainable.items()})
    _strict_tree({f"{n}.{k}": v for n, st in opt.state.items() for k, v in st.items() if k != "step"})
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert np.array_equal(to_numpy(p.data), q.data), n  # same seeds, same operations: the same bits


def test_paged_pool_device_tier_is_strict_and_host_tier_is_host():
    from minilora.optim.paged import PagedTensor
    model, opt = _qlora_step("numpy-strict", paged_budget=4096)
    ref, _ = _qlora_step("numpy")
    pool = opt.pool
    assert pool.stats.evictions > 0 and pool.stats.prefetches > 0
    pages = [p for t in pool.tensors.values() for p in t.pages]
    assert all(p.where == "host" and type(p.host) is np.ndarray for p in pages)     # evict_all ended each step
    first = next(iter(pool.tensors.values()))
    pool.prefetch_tensors([first])
    assert all(p.where == "device" and isinstance(p.device, StrictArray) for p in first.pages)
    assert isinstance(pool.gather(first), StrictArray)
    assert any(isinstance(st.get("exp_avg"), PagedTensor) for st in opt.state.values())
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert np.array_equal(to_numpy(p.data), q.data), n  # paging moved bytes, never changed them


def test_training_loop_adapter_files_and_memory_report_on_the_device(tmp_path):
    from minilora.nn import GPT, GPTConfig
    from minilora.optim import AdamW
    from minilora.peft import LoraConfig, PeftModel, get_peft_model, memory_report
    from minilora.train import train

    def run(name, ckpt, steps):
        with use_backend(name):
            cfg = GPTConfig(**TINY)
            model = get_peft_model(GPT(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.1))
            opt = AdamW(model.named_parameters(), lr=1e-2)

            def get_batch(rng):                              # sampled on the host; train() moves it in
                x = rng.integers(0, cfg.vocab_size, (2, cfg.block_size + 1))
                return x[:, :-1], x[:, 1:]
            res = train(model, opt, get_batch, max_steps=steps, seed=0, checkpoint_dir=ckpt, checkpoint_every=2,
                        progress=False)
            return model, opt, res, cfg

    _, _, ref, _ = run("numpy", None, 3)
    run("numpy-strict", tmp_path / "ckpt", 2)                # stops after its step-2 checkpoint
    model, opt, res, cfg = run("numpy-strict", tmp_path / "ckpt", 3)   # a new process would resume the same way
    assert res.resumed_from == 2
    assert res.train_loss == ref.train_loss                  # the strict run is NumPy's run, bit for bit
    with use_backend("numpy-strict"):
        _strict_tree({n: p.data for n, p in model.named_parameters()})
        model.save_pretrained(tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(GPT(cfg), tmp_path / "adapter")
        ad = {n: p.data for n, p in loaded.named_parameters() if ".lora_" in n}
        _strict_tree(ad)
        for n, p in model.named_parameters():
            if n in ad:
                np.testing.assert_array_equal(to_numpy(ad[n]), to_numpy(p.data))
        rep = memory_report(model, opt)
        assert rep["n_trainable"] == sum(p.data.size for p in model.parameters() if p.requires_grad) > 0


def test_quick_demo_runs_to_the_end_on_the_strict_backend(tmp_path):
    # `MINILORA_BACKEND=numpy-strict minilora demo --quick` with 3 steps of batch 1: every method, the evaluation,
    # inference, adapter files and figures, in a fresh process that reads the variable at import time.
    env = dict(os.environ, MINILORA_BACKEND="numpy-strict", MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-m", "minilora.apps.cli", "demo", "--quick", "--steps", "3", "--batch-size",
                        "1", "--no-progress", "--out", str(tmp_path)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "table.json").is_file() and (tmp_path / "adapters").is_dir()
