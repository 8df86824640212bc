"""The training loop: loss goes down (first loss pinned), resume is bit-identical, checkpoints are atomic and checked.

Most tests use TinyLM, a stand-in with the GPT's interface (`logits, loss = model(idx, targets)`, `backward()`,
`named_parameters()`, `zero_grad()`, `train()`/`eval()`) and a hand-written backward, including a dropout whose
random generator lives on the model, so the loop's RNG checkpointing is tested on the hard case. The last tests run
the real minilora.nn.GPT (full and LoRA) when it is importable.
"""
import json

import numpy as np
import pytest

from minilora.io import CorruptFileError
from minilora.nn.parameter import Parameter
from minilora.optim import SGD, AdamW, get_cosine_schedule_with_warmup
from minilora.train import CHECKPOINT_JSON, TrainResult, evaluate, load_checkpoint, train

V, D, H = 11, 6, 16


class TinyLM:
    """Embedding -> tanh MLP -> dropout -> vocabulary logits -> mean cross-entropy, float64, backward by hand."""

    def __init__(self, seed=0, p_drop=0.0, freeze_embedding=False):
        rng = np.random.default_rng(seed)
        self.wte = Parameter(rng.standard_normal((V, D)) * 0.5, requires_grad=not freeze_embedding)
        self.w1 = Parameter(rng.standard_normal((H, D)) / np.sqrt(D))
        self.b1 = Parameter(np.zeros(H))
        self.w2 = Parameter(rng.standard_normal((V, H)) / np.sqrt(H))
        self.p_drop, self.dropout_rng, self.training = p_drop, np.random.default_rng(seed + 1), True

    def named_modules(self):
        yield "", self

    def named_parameters(self):
        return [("wte", self.wte), ("w1", self.w1), ("b1", self.b1), ("w2", self.w2)]

    def zero_grad(self):
        for _, p in self.named_parameters():
            p.grad = None

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, idx, targets):
        x = self.wte.data[idx.ravel()]                              # (N, D)
        h = np.tanh(x @ self.w1.data.T + self.b1.data)              # (N, H)
        mask = np.ones_like(h)
        if self.training and self.p_drop:
            mask = (self.dropout_rng.random(h.shape) >= self.p_drop) / (1 - self.p_drop)
        logits = (h * mask) @ self.w2.data.T                        # (N, V)
        z = logits - logits.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))          # (N, V)
        t = targets.ravel()
        self.cache = (idx.ravel(), x, h, mask, logp, t)
        return logits, -logp[np.arange(len(t)), t].mean()

    def backward(self):
        idx, x, h, mask, logp, t = self.cache
        dlogits = np.exp(logp)
        dlogits[np.arange(len(t)), t] -= 1
        dlogits /= len(t)                                           # (N, V)
        self.w2.accumulate_grad(dlogits.T @ (h * mask))             # (V, H)
        dpre = (dlogits @ self.w2.data) * mask * (1 - h * h)        # (N, H)
        self.w1.accumulate_grad(dpre.T @ x)                         # (H, D)
        self.b1.accumulate_grad(dpre.sum(0))                        # (H,)
        dwte = np.zeros_like(self.wte.data)
        np.add.at(dwte, idx, dpre @ self.w1.data)                   # (V, D)
        self.wte.accumulate_grad(dwte)


DATA = np.array([(7 * i + (i // 5) % 3) % V for i in range(400)])   # a learnable, not quite periodic sequence


def get_batch(rng, B=4, T=8):
    s = rng.integers(0, len(DATA) - T - 1, B)
    return np.stack([DATA[i:i + T] for i in s]), np.stack([DATA[i + 1:i + T + 1] for i in s])


EVAL = [get_batch(np.random.default_rng(123)) for _ in range(2)]


def make_run(p_drop=0.3, freeze=False):
    model = TinyLM(p_drop=p_drop, freeze_embedding=freeze)
    return model, AdamW(model.named_parameters(), lr=3e-2, weight_decay=0.01)


RUN = dict(max_steps=12, grad_accum_steps=2, max_grad_norm=1.0, eval_every=4, eval_batches=EVAL, seed=7,
           lr_schedule=get_cosine_schedule_with_warmup(2, 12), progress=False)


def weights(model):
    return {n: p.data.copy() for n, p in model.named_parameters()}


def test_loss_goes_down_and_first_loss_is_pinned():
    model, opt = make_run(p_drop=0.0)
    res = train(model, opt, get_batch, max_steps=60, seed=0, progress=False, eval_batches=EVAL, eval_every=20)
    assert isinstance(res, TrainResult) and res.step == 60 and len(res.train_loss) == 60
    assert res.train_loss[0] == pytest.approx(2.5142080418, abs=1e-9)         # golden: seed 0, TinyLM(seed=0)
    assert np.mean(res.train_loss[-10:]) < 0.5 * res.train_loss[0]
    assert [s for s, _ in res.eval_loss] == [0, 20, 40, 60]
    assert res.eval_loss[-1][1] < 0.5 * res.eval_loss[0][1]
    assert res.eval_loss[0][1] == pytest.approx(evaluate(TinyLM(p_drop=0.0), EVAL), rel=1e-15)
    assert len(res.step_time) == 60 and all(t > 0 for t in res.step_time)


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    m1, o1 = make_run()
    full = train(m1, o1, get_batch, checkpoint_dir=tmp_path / "a", checkpoint_every=3, **RUN)

    calls = {"n": 0}

    def crashing_get_batch(rng):                      # dies inside step 8 (0-based 7), after the step-6 checkpoint
        calls["n"] += 1
        if calls["n"] == 2 * 7 + 2:
            raise KeyboardInterrupt
        return get_batch(rng)

    m2, o2 = make_run()
    with pytest.raises(KeyboardInterrupt):
        train(m2, o2, crashing_get_batch, checkpoint_dir=tmp_path / "b", checkpoint_every=3, **RUN)
    assert load_checkpoint(tmp_path / "b")[0]["step"] == 6
    m3, o3 = make_run()                               # a new process: fresh model, optimizer, generators
    resumed = train(m3, o3, get_batch, checkpoint_dir=tmp_path / "b", checkpoint_every=3, **RUN)
    assert resumed.resumed_from == 6 and resumed.step == 12
    for (n, a), b in zip(weights(m1).items(), weights(m3).values(), strict=True):
        assert np.array_equal(a, b), n                                            # bit-identical
    for n in o1.state:
        for k in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(o1.state[n][k], o3.state[n][k])
    assert resumed.train_loss == full.train_loss and resumed.eval_loss == full.eval_loss
    assert resumed.lr == full.lr and resumed.grad_norm == full.grad_norm
    assert m3.dropout_rng.bit_generator.state == m1.dropout_rng.bit_generator.state
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [CHECKPOINT_JSON, "step-0000012.safetensors"]


def test_stop_and_continue_to_more_steps_equals_one_run(tmp_path):
    kw = dict(RUN, max_steps=10, lr_schedule=get_cosine_schedule_with_warmup(2, 10))
    m1, o1 = make_run()
    train(m1, o1, get_batch, **kw)
    m2, o2 = make_run()
    train(m2, o2, get_batch, checkpoint_dir=tmp_path, **dict(kw, max_steps=5))
    m3, o3 = make_run()
    train(m3, o3, get_batch, checkpoint_dir=tmp_path, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(weights(m1).values(), weights(m3).values(), strict=True))


def test_without_the_dropout_state_resume_would_differ(tmp_path, monkeypatch):
    # guards the test above: if the model's generator were not checkpointed, the resumed weights would differ
    import minilora.train
    m1, o1 = make_run()
    train(m1, o1, get_batch, **RUN)
    m4, o4 = make_run()
    m4.named_modules = lambda: iter(())                                         # hide the generator from the loop
    train(m4, o4, get_batch, checkpoint_dir=tmp_path / "a", **dict(RUN, max_steps=6))
    m5, o5 = make_run()
    with pytest.raises(ValueError, match="random generators"):                 # a mismatch is caught, not ignored
        train(m5, o5, get_batch, checkpoint_dir=tmp_path / "a", **RUN)
    monkeypatch.setattr(minilora.train, "_model_rngs", lambda model: {})
    m2, o2 = make_run()
    train(m2, o2, get_batch, checkpoint_dir=tmp_path / "b", **dict(RUN, max_steps=6))
    m3, o3 = make_run()
    train(m3, o3, get_batch, checkpoint_dir=tmp_path / "b", **RUN)
    assert not np.array_equal(weights(m1)["w2"], weights(m3)["w2"])


def test_frozen_parameters_untouched_and_not_checkpointed(tmp_path):
    model, opt = make_run(freeze=True)
    wte0 = model.wte.data.copy()
    train(model, opt, get_batch, checkpoint_dir=tmp_path, **RUN)
    assert np.array_equal(model.wte.data, wte0) and model.wte.grad is None
    assert "wte" not in opt.state
    meta, tensors = load_checkpoint(tmp_path)
    assert sorted(tensors) == sorted(["model.w1", "model.b1", "model.w2"]
                                     + [f"optimizer.{n}.{b}" for n in ("w1", "b1", "w2")
                                        for b in ("exp_avg", "exp_avg_sq")])
    assert meta["optimizer"]["steps"] == {"w1": 12, "b1": 12, "w2": 12}


def test_gradient_accumulation_equals_the_big_batch():
    batches = [get_batch(np.random.default_rng(s)) for s in (1, 2)]
    it = iter(batches)
    m1 = TinyLM()
    train(m1, SGD(m1.named_parameters(), lr=0.5), lambda rng: next(it), max_steps=1, grad_accum_steps=2,
          progress=False)
    big = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    m2 = TinyLM()
    train(m2, SGD(m2.named_parameters(), lr=0.5), lambda rng: big, max_steps=1, progress=False)
    for a, b in zip(weights(m1).values(), weights(m2).values(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    assert not np.array_equal(weights(m1)["w2"], TinyLM().w2.data)


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import minilora.io
    import minilora.train
    m, o = make_run()
    train(m, o, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=3))
    before = (tmp_path / CHECKPOINT_JSON).read_bytes()

    def broken_replace(src, dst):                     # the disk fills up while the JSON is being renamed into place
        raise OSError(28, "No space left on device")
    real_save_json = minilora.train.save_json

    def failing_save_json(path, obj):
        monkeypatch.setattr(minilora.io.os, "replace", broken_replace)
        real_save_json(path, obj)
    monkeypatch.setattr(minilora.train, "save_json", failing_save_json)
    with pytest.raises(OSError, match="No space"):
        train(m, o, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=6))
    monkeypatch.undo()
    assert (tmp_path / CHECKPOINT_JSON).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]       # no temp file left behind
    meta, _ = load_checkpoint(tmp_path)                                         # still a valid step-3 checkpoint
    assert meta["step"] == 3
    m2, o2 = make_run()
    assert train(m2, o2, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=3)).resumed_from == 3


@pytest.mark.parametrize("damage, match", [
    ("truncate", "SHA-256"), ("flip", "SHA-256"), ("json", "not valid JSON"), ("delete", "is missing"),
    ("key", "missing \\['sha256'\\]")])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage, match):
    m, o = make_run()
    train(m, o, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=2))
    tens = next(tmp_path.glob("step-*.safetensors"))
    js = tmp_path / CHECKPOINT_JSON
    if damage == "truncate":
        tens.write_bytes(tens.read_bytes()[:-50])
    elif damage == "flip":
        raw = bytearray(tens.read_bytes())
        raw[-3] ^= 0x10
        tens.write_bytes(bytes(raw))
    elif damage == "json":
        js.write_text(js.read_text()[:40])
    elif damage == "delete":
        tens.unlink()
    else:
        meta = json.loads(js.read_text())
        del meta["sha256"]
        js.write_text(json.dumps(meta))
    m2, o2 = make_run()
    with pytest.raises(CorruptFileError, match=match):
        train(m2, o2, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=4))


def test_resaving_the_same_step_never_overwrites_the_committed_tensors(tmp_path, monkeypatch):
    """resume=False into a folder that already holds step 2: the new tensors go to another file, so a crash before
    the new checkpoint.json leaves the old checkpoint loadable (it used to be overwritten in place: SHA-256 error)."""
    import minilora.train as tr
    m, o = make_run()
    train(m, o, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=2))
    old_meta, old_tensors = load_checkpoint(tmp_path)

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(tr, "save_json", crash)
    m2, o2 = make_run()
    with pytest.raises(OSError, match="disk full"):
        train(m2, o2, get_batch, checkpoint_dir=tmp_path, resume=False, overwrite=True,
              **dict(RUN, max_steps=2, seed=1))
    meta, tensors = load_checkpoint(tmp_path)                       # still the first run's, intact
    assert meta["sha256"] == old_meta["sha256"] and tensors.keys() == old_tensors.keys()
    monkeypatch.undo()
    train(m2, o2, get_batch, checkpoint_dir=tmp_path, resume=False, overwrite=True, **dict(RUN, max_steps=2, seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_JSON, "step-0000002.b.safetensors"]
    js = tmp_path / CHECKPOINT_JSON
    meta = json.loads(js.read_text())
    meta["tensors"] = "../step-0000002.b.safetensors"
    js.write_text(json.dumps(_rehash(meta)))                        # even with its digest recomputed
    with pytest.raises(CorruptFileError, match="not a file name in this folder"):
        load_checkpoint(tmp_path)


def test_resume_with_a_different_setup_is_refused(tmp_path):
    m, o = make_run()
    train(m, o, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=2))
    m2, o2 = make_run()
    with pytest.raises(ValueError, match="grad_accum_steps=2"):
        train(m2, o2, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=4, grad_accum_steps=1))
    m3, o3 = make_run(freeze=True)
    with pytest.raises(ValueError, match="only in the checkpoint: \\['wte'\\]"):
        train(m3, o3, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=4))
    m4, o4 = make_run()                               # resume=False, overwrite=True starts over and replaces it
    assert train(m4, o4, get_batch, checkpoint_dir=tmp_path, resume=False, overwrite=True,
                 **dict(RUN, max_steps=1)).step == 1


@pytest.mark.parametrize("kw, match", [
    (dict(max_steps=-1), "max_steps"), (dict(grad_accum_steps=0), "grad_accum_steps"),
    (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(eval_fn=len), "not both")])
def test_bad_arguments(kw, match):
    m, o = make_run()
    with pytest.raises(ValueError, match=match):
        train(m, o, get_batch, **dict(RUN, **kw))


def test_divergence_is_reported_with_the_step():
    m, o = make_run()
    m.w2.data[0, 0] = np.nan
    with pytest.raises(ValueError, match="loss is nan at step 0 \\(micro-batch 0\\)"):
        train(m, o, get_batch, **RUN)


def test_progress_bar_and_log(capsys):
    m, o = make_run()
    records = []
    train(m, o, get_batch, **dict(RUN, max_steps=4, progress=True), log=records.append)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "eval_loss" in records[3]
    assert {"loss", "lr", "time", "grad_norm"} <= set(records[0])
    assert "4/4" in capsys.readouterr().err


# ---- the real model ------------------------------------------------------------------------------------------------

def _gpt():
    nn = pytest.importorskip("minilora.nn")
    if not hasattr(nn, "GPT"):
        pytest.skip("minilora.nn.GPT not available yet")
    return nn


def gpt_batch(rng, B=2, T=16, vocab=32):
    x = rng.integers(0, vocab, (B, T + 1))
    x[:, 1::2] = (x[:, 0:-1:2] + 1) % vocab          # every second token is predictable from the one before
    return x[:, :-1], x[:, 1:]


def test_tiny_gpt_full_finetune_loss_goes_down():
    nn = _gpt()
    model = nn.GPT(nn.GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, dtype="float64"))
    opt = AdamW(model.named_parameters(), lr=3e-3, weight_decay=0.0)
    res = train(model, opt, gpt_batch, max_steps=25, seed=0, progress=False)
    assert res.train_loss[0] == pytest.approx(3.5006186796, abs=1e-9)      # golden (ln 32 = 3.466); GPT seed 0
    assert np.mean(res.train_loss[-5:]) < res.train_loss[0] - 0.3


def _peft():
    _gpt()
    peft = pytest.importorskip("minilora.peft")
    if not hasattr(peft, "get_peft_model"):
        pytest.skip("minilora.peft.get_peft_model not available yet")
    return peft


def tiny_lora_gpt(qlora=False):
    nn, peft = _gpt(), _peft()
    model = nn.GPT(nn.GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=64, dtype="float32"))
    if qlora:
        model = peft.prepare_model_for_kbit_training(peft.quantize_model(model))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                       target_modules=["c_attn", "c_proj", "c_fc"]))
    return model, AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.0)


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_gpt_adapter_training_resumes_bit_identically(tmp_path, qlora):
    kw = dict(max_steps=6, grad_accum_steps=2, max_grad_norm=0.3, seed=1, progress=False,
              lr_schedule=get_cosine_schedule_with_warmup(1, 6))
    m1, o1 = tiny_lora_gpt(qlora)
    frozen = {n: p.data.copy() for n, p in m1.named_parameters() if not p.requires_grad}
    full = train(m1, o1, gpt_batch, **kw)
    assert np.mean(full.train_loss[-2:]) < full.train_loss[0]
    for n, p in m1.named_parameters():
        if not p.requires_grad:
            assert np.array_equal(p.data, frozen[n]), n               # the frozen (or 4-bit) base never moves
    m2, o2 = tiny_lora_gpt(qlora)
    train(m2, o2, gpt_batch, checkpoint_dir=tmp_path, **dict(kw, max_steps=3))
    meta, tensors = load_checkpoint(tmp_path)
    assert all(".lora_A." in k or ".lora_B." in k for k in tensors)          # only the adapters are saved
    assert any(k.startswith("model:") for k in meta["rng"])                    # the LoRA dropout generator
    m3, o3 = tiny_lora_gpt(qlora)
    resumed = train(m3, o3, gpt_batch, checkpoint_dir=tmp_path, **kw)
    assert resumed.resumed_from == 3 and resumed.train_loss == full.train_loss
    for (n, a), (_, b) in zip(m1.named_parameters(), m3.named_parameters(), strict=True):
        assert np.array_equal(a.data, b.data), n


# ---- nothing lost, nothing tampered, nothing outside the folder ------------------------------------------------------

def test_a_fresh_run_into_a_folder_holding_a_checkpoint_is_refused_unless_overwrite(tmp_path):
    m, o = make_run()
    train(m, o, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=4))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    m2, o2 = make_run()
    with pytest.raises(FileExistsError, match="overwrite=True") as e:
        train(m2, o2, get_batch, checkpoint_dir=tmp_path, resume=False, **dict(RUN, max_steps=2))
    assert "step 4" in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before     # untouched
    res = train(m2, o2, get_batch, checkpoint_dir=tmp_path, resume=False, overwrite=True, **dict(RUN, max_steps=2))
    assert res.step == 2 and load_checkpoint(tmp_path)[0]["step"] == 2


def test_a_resume_mismatch_advises_overwrite_not_a_fresh_start(tmp_path):
    m, o = make_run()
    train(m, o, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=2))
    m2, o2 = make_run()
    with pytest.raises(ValueError, match="seed=7") as e:
        train(m2, o2, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=4, seed=8))
    assert "overwrite=True" in str(e.value) and "use resume=False" not in str(e.value)


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_any_step(tmp_path):
    f = tmp_path / "ckpt"
    f.write_text("x")
    calls = []
    m, o = make_run()
    with pytest.raises(NotADirectoryError, match="not a folder"):
        train(m, o, lambda rng: calls.append(1) or get_batch(rng), checkpoint_dir=f, **RUN)
    assert calls == []


def _rehash(meta):
    """A tamperer who also recomputes checkpoint.json's own digest (when the format has one)."""
    if "meta_sha256" in meta:
        from minilora.train import _meta_digest
        meta["meta_sha256"] = _meta_digest(meta)
    return meta


def _set(path, value):
    def edit(meta):
        d = meta
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return edit


def _first_param_steps(value):
    def edit(meta):
        steps = meta["optimizer"]["steps"]
        steps[next(iter(steps))] = value
    return edit


TAMPER = {
    "lr=-1": _set(("optimizer", "hyperparams", "lr"), -1.0),
    "initial_lr=nan": _set(("optimizer", "hyperparams", "initial_lr"), float("nan")),
    "lr='x'": _set(("optimizer", "hyperparams", "lr"), "x"),
    "betas=[2,2]": _set(("optimizer", "hyperparams", "betas"), [2, 2]),
    "step=-5": _set(("step",), -5),
    "step=2.5": _set(("step",), 2.5),
    "step='3'": _set(("step",), "3"),
    "step=1000": _set(("step",), 1000),
    "rng garbage": _set(("rng", "batch", "state", "state"), "x"),
    "rng MT19937": _set(("rng", "batch", "bit_generator"), "MT19937"),
    "optimizer step -1": _first_param_steps(-1),
    "optimizer step 0": _first_param_steps(0),
    "history truncated": lambda meta: meta["history"]["train_loss"].pop(),
    "history without lr": lambda meta: meta["history"].pop("lr"),
}


@pytest.mark.parametrize("rehash", [False, True], ids=["plain-edit", "digest-recomputed"])
@pytest.mark.parametrize("tamper", list(TAMPER), ids=list(TAMPER))
def test_a_tampered_checkpoint_json_is_refused(tmp_path, tamper, rehash):
    m, o = make_run()
    train(m, o, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=4))
    js = tmp_path / CHECKPOINT_JSON
    meta = json.loads(js.read_text())
    TAMPER[tamper](meta)
    js.write_text(json.dumps(_rehash(meta) if rehash else meta))
    m2, o2 = make_run()
    with pytest.raises(CorruptFileError, match=CHECKPOINT_JSON):
        train(m2, o2, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=6))


def test_orphaned_temp_files_are_cleaned_up_when_the_next_run_resumes(tmp_path):
    m, o = make_run()
    train(m, o, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=2))
    orphans = [".step-0000003.safetensors.a1b2c3d4.tmp", ".step-0000003.b.safetensors.zz_9x8y7.tmp",
               ".checkpoint.json.q1w2e3r4.tmp"]
    keep = ["notes.tmp", ".other.a1b2c3d4.tmp", "step-0000001.safetensors.bak"]
    for n in orphans + keep:
        (tmp_path / n).write_bytes(b"partial")
    m2, o2 = make_run()
    train(m2, o2, get_batch, checkpoint_dir=tmp_path, **dict(RUN, max_steps=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_JSON, "step-0000003.safetensors", *keep])


@pytest.mark.parametrize("which", ["tensors", "json"])
def test_a_checkpoint_file_that_is_a_symlink_leading_outside_is_refused(tmp_path, which):
    d = tmp_path / "ckpt"
    m, o = make_run()
    train(m, o, get_batch, checkpoint_dir=d, **dict(RUN, max_steps=2))
    outside = tmp_path / "outside"
    outside.mkdir()
    name = load_checkpoint(d)[0]["tensors"] if which == "tensors" else CHECKPOINT_JSON
    (d / name).rename(outside / name)
    (d / name).symlink_to(outside / name)
    with pytest.raises(CorruptFileError, match="outside"):
        load_checkpoint(d)


@pytest.mark.parametrize("shape", [(0, 8), (4, 0)])
def test_an_empty_batch_is_refused_with_the_step(shape):
    m, o = make_run()
    with pytest.raises(ValueError, match="empty batch .* at step 0"):
        train(m, o, lambda rng: (np.zeros(shape, np.int64), np.zeros(shape, np.int64)), **RUN)


def _cyclomatic_complexity(fn) -> int:
    """1 + one per branch point (if, loop, except, boolean operator, conditional expression, comprehension filter)."""
    import ast
    import inspect
    import textwrap
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    n = 1
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.For, ast.While, ast.IfExp, ast.ExceptHandler)):
            n += 1
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            n += 1 + len(node.ifs)
    return n


def test_the_loop_reads_in_one_screen():
    """train() is a short loop over named steps (resume or start, one update, eval, checkpoint), each step short."""
    import inspect

    import minilora.train as tr
    lines = len(inspect.getsourcelines(tr.train)[0])
    assert lines <= 60 and _cyclomatic_complexity(tr.train) <= 10, (lines, _cyclomatic_complexity(tr.train))
    for name in ("_resume_or_start", "_train_step", "_maybe_eval", "_maybe_checkpoint"):
        fn = getattr(tr, name)
        assert len(inspect.getsourcelines(fn)[0]) <= 45 and _cyclomatic_complexity(fn) <= 12, name
