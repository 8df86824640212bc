"""The training loop: one loop for full fine-tuning, LoRA and QLoRA, with checkpoint/resume that is bit-exact.

The mode only decides which Parameters have `requires_grad=True`; the loop trains whatever the optimizer holds. One
optimizer step is

    for k in 1..K (grad_accum_steps):  loss_k = model(get_batch(rng)); model.backward()   # grads add up (+=)
    g ← g / K                                    the gradient of the mean loss over K micro-batches
    g ← g · min(1, max_norm / (‖g‖ + 1e-6))      optional global-norm clipping (QLoRA used 0.3)
    lr ← initial_lr · schedule(step);  optimizer.step()

as in nanoGPT's `train.py` and the Hugging Face Trainer (`gradient_accumulation_steps`, `max_grad_norm`,
`lr_scheduler_type`). Batches are drawn by `get_batch(rng)` from a host NumPy Generator the loop owns, seeded by
`seed`, so the data order is part of the run's state.

Checkpoints (every `checkpoint_every` steps and at the end) hold everything that decides the future of the run:
the trainable parameters (a frozen base is rebuilt by the caller, so a LoRA checkpoint stays small), the optimizer's
buffers and step counts, the state of every random generator (the batch sampler, generators passed in `rngs`, and
any NumPy Generator found as an attribute of a module, e.g. a LoRA dropout's), and the history. A run stopped half
way and resumed therefore ends with bit-identical weights to one that never stopped.

A checkpoint is two files, committed in two atomic steps: the arrays go to `step-<N>.safetensors`, then
`checkpoint.json` (step, RNG states, optimizer step counts, config, history, the tensor file's name and SHA-256) is
renamed into place. The JSON is the commit record: a crash between the two writes leaves the previous checkpoint
valid, and a truncated or altered tensor file is caught by its hash. Nothing is loaded with pickle.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minilora.backend import asarray, default_rng, get_array_module, use_backend
from minilora.io import CorruptFileError, load_json, load_safetensors, save_json, save_safetensors
from minilora.optim.clip import clip_grad_norm_

CHECKPOINT_JSON = "checkpoint.json"
FORMAT = "minilora-checkpoint-v1"


@dataclass
class TrainResult:
    step: int = 0                                            # optimizer steps done
    train_loss: list = field(default_factory=list)           # per step: mean loss over the accumulated micro-batches
    lr: list = field(default_factory=list)                   # per step: the learning rate used
    grad_norm: list = field(default_factory=list)            # per step: global norm before clipping (if clipping)
    step_time: list = field(default_factory=list)            # per step: seconds (forward + backward + update)
    eval_loss: list = field(default_factory=list)            # [(step, loss)]: step 0, every eval_every, the end
    resumed_from: int | None = None                          # the checkpoint step this process started from

    @property
    def final_eval_loss(self):
        return self.eval_loss[-1][1] if self.eval_loss else None


# ---- random generators: their state is plain JSON (NumPy's bit_generator.state is a dict of ints and strings) ---

def _rng_state(name, rng):
    try:
        return rng.bit_generator.state
    except AttributeError:
        pass
    if hasattr(rng, "state_dict"):
        return rng.state_dict()
    raise TypeError(f"cannot checkpoint random generator {name!r} ({type(rng).__module__}.{type(rng).__name__}): "
                    "use a NumPy Generator (numpy.random.default_rng) or an object with state_dict/load_state_dict")


def _set_rng_state(name, rng, state):
    if hasattr(rng, "bit_generator") and not hasattr(rng, "load_state_dict"):
        rng.bit_generator.state = state
    elif hasattr(rng, "load_state_dict"):
        rng.load_state_dict(state)
    else:
        raise TypeError(f"cannot restore random generator {name!r} ({type(rng).__name__})")


def _model_rngs(model) -> dict:
    """NumPy Generators held as module attributes (e.g. a dropout's), named by module path, each object once."""
    found, seen = {}, set()
    if not hasattr(model, "named_modules"):
        return found
    for path, mod in model.named_modules():
        for k, v in vars(mod).items():
            if hasattr(v, "bit_generator") and hasattr(v, "random") and id(v) not in seen:
                seen.add(id(v))
                found[f"model:{path}.{k}" if path else f"model:{k}"] = v
    return found


# ---- checkpoints --------------------------------------------------------------------------------------------------

def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_checkpoint(checkpoint_dir, model, optimizer, step: int, rngs: dict, result: TrainResult, config: dict):
    """Write step-<step>.safetensors then checkpoint.json (the commit), then delete older tensor files."""
    d = Path(checkpoint_dir)
    tensors = {f"model.{n}": p.data for n, p in _trainable(model)}
    sd = optimizer.state_dict()
    steps = {}
    for name, st in sd["state"].items():
        steps[name] = st["step"]
        tensors.update({f"optimizer.{name}.{b}": a for b, a in st.items() if b != "step"})
    fname = f"step-{step:07d}.safetensors"
    if fname == _committed_tensor_file(d):                   # same step again (e.g. resume=False into an old
        fname = f"step-{step:07d}.b.safetensors"             # folder): never overwrite the committed tensors
    save_safetensors(d / fname, tensors, metadata={"format": "pt", "minilora": FORMAT, "step": step})
    meta = {
        "format": FORMAT, "step": step, "tensors": fname,
        "sha256": hashlib.sha256((d / fname).read_bytes()).hexdigest(),
        "optimizer": {"class": type(optimizer).__name__, "hyperparams": sd["hyperparams"],
                      "step_count": sd["step_count"], "steps": steps},
        "rng": {name: _rng_state(name, r) for name, r in rngs.items()},
        "config": config, "history": asdict(result),
    }
    save_json(d / CHECKPOINT_JSON, meta)
    for old in d.glob("step-*.safetensors"):                 # only after the commit: the old files are now garbage
        if old.name != fname:
            old.unlink(missing_ok=True)


def _committed_tensor_file(d: Path):
    """The tensor file name the current checkpoint.json points to, or None (no checkpoint or an unreadable one)."""
    try:
        return load_json(d / CHECKPOINT_JSON).get("tensors")
    except (OSError, ValueError, AttributeError):
        return None


def load_checkpoint(checkpoint_dir) -> tuple[dict, dict]:
    """(meta, tensors) of the checkpoint in a folder; CorruptFileError when anything is missing or altered."""
    d = Path(checkpoint_dir)
    meta = load_json(d / CHECKPOINT_JSON)
    missing = [k for k in ("format", "step", "tensors", "sha256", "optimizer", "rng", "config", "history")
               if k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise CorruptFileError(f"{d / CHECKPOINT_JSON}: not a {FORMAT} checkpoint "
                               f"({'missing ' + str(missing) if missing else 'format ' + repr(meta.get('format'))})")
    if not isinstance(meta["tensors"], str) or Path(meta["tensors"]).name != meta["tensors"]:
        raise CorruptFileError(f"{d / CHECKPOINT_JSON}: tensor file {meta['tensors']!r} is not a file name in "
                               "this folder")
    path = d / meta["tensors"]
    if not path.is_file():
        raise CorruptFileError(f"{d / CHECKPOINT_JSON}: its tensor file {meta['tensors']} is missing")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != meta["sha256"]:
        raise CorruptFileError(f"{path}: SHA-256 {digest[:12]}... does not match {meta['sha256'][:12]}... recorded "
                               "in checkpoint.json: the file is truncated or corrupt")
    tensors, _ = load_safetensors(path)
    return meta, tensors


def _restore(meta, tensors, model, optimizer, rngs: dict, path) -> TrainResult:
    """Copy a checkpoint into the live model/optimizer/generators (in place, so references stay valid)."""
    params = dict(_trainable(model))
    saved = {k[len("model."):] for k in tensors if k.startswith("model.")}
    if saved != set(params):
        raise ValueError(f"{path}: checkpoint trains {len(saved)} parameters, this model {len(params)}; "
                         f"only in the checkpoint: {sorted(saved - set(params))[:3]}, "
                         f"only in the model: {sorted(set(params) - saved)[:3]} (same model and adapters?)")
    for name, p in params.items():
        a = tensors[f"model.{name}"]
        if a.shape != p.data.shape or a.dtype != p.data.dtype:
            raise ValueError(f"{path}: {name} is {a.dtype}{list(a.shape)} in the checkpoint, "
                             f"{p.data.dtype}{list(p.data.shape)} in the model")
        p.data[...] = get_array_module(p.data).asarray(a)
    om = meta["optimizer"]
    if om["class"] != type(optimizer).__name__:
        raise ValueError(f"{path}: checkpoint was written by {om['class']}, resuming with {type(optimizer).__name__}")
    state = {}
    for name, step in om["steps"].items():
        prefix = f"optimizer.{name}."
        state[name] = {"step": step, **{k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}}
    optimizer.load_state_dict({"hyperparams": om["hyperparams"], "step_count": om["step_count"], "state": state})
    if set(meta["rng"]) != set(rngs):
        raise ValueError(f"{path}: checkpoint has random generators {sorted(meta['rng'])}, this run "
                         f"{sorted(rngs)}")
    for name, r in rngs.items():
        _set_rng_state(name, r, meta["rng"][name])
    h = meta["history"]
    return TrainResult(step=meta["step"], train_loss=h["train_loss"], lr=h["lr"], grad_norm=h["grad_norm"],
                       step_time=h["step_time"], eval_loss=[tuple(e) for e in h["eval_loss"]],
                       resumed_from=meta["step"])


# ---- the loop -----------------------------------------------------------------------------------------------------

def evaluate(model, batches) -> float:
    """Mean loss over fixed (idx, targets) batches, in eval mode (no dropout); restores the previous mode."""
    was_training = getattr(model, "training", True)
    model.eval()
    try:
        losses = [float(model(asarray(x), asarray(y))[1]) for x, y in batches]
    finally:
        model.train(was_training)
    return math.fsum(losses) / len(losses)


def train(model, optimizer, get_batch, *, max_steps: int, grad_accum_steps: int = 1, max_grad_norm=None,
          lr_schedule=None, eval_every: int = 0, eval_batches=None, eval_fn=None, checkpoint_dir=None,
          checkpoint_every: int = 0, resume: bool = True, seed: int = 0, rngs=None, config=None,
          progress: bool = True, desc: str = "train", log=None) -> TrainResult:
    """Train until `max_steps` optimizer steps are done; returns the TrainResult (history included on resume).

    get_batch(rng) -> (idx, targets): draws one micro-batch with the loop's host NumPy Generator.
    lr_schedule(step) -> multiplier of optimizer.initial_lr (see minilora.optim.schedule), or None for constant.
    eval_batches (fixed list of (idx, targets)) or eval_fn(model) -> float: run at step 0, every eval_every, the end.
    checkpoint_dir: resume from it if it holds a checkpoint (and resume=True), save there every checkpoint_every
    steps and at the end. rngs: extra named generators to checkpoint. config: JSON-able dict stored with it.
    log(record): called after every step with {"step", "loss", "lr", "time", ["grad_norm"], ["eval_loss"]}.
    """
    for name, v in (("max_steps", max_steps), ("grad_accum_steps", grad_accum_steps),
                    ("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "grad_accum_steps" else 0):
            raise ValueError(f"invalid {name} {v!r}: must be an integer >= {1 if name == 'grad_accum_steps' else 0}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"invalid max_grad_norm {max_grad_norm!r}: must be > 0 (or None for no clipping)")
    if eval_batches is not None and eval_fn is not None:
        raise ValueError("give eval_batches or eval_fn, not both")
    if eval_batches is not None:
        eval_batches = list(eval_batches)
        if not eval_batches:
            raise ValueError("eval_batches is empty")
        eval_fn = lambda m: evaluate(m, eval_batches)          # noqa: E731
    with use_backend("numpy"):                               # batches are sampled on the host, whatever the backend
        batch_rng = default_rng(seed)
    all_rngs = {"batch": batch_rng, **_model_rngs(model), **dict(rngs or {})}
    run_config = {"seed": seed, "grad_accum_steps": grad_accum_steps, "max_grad_norm": max_grad_norm,
                  **dict(config or {})}

    result = TrainResult()
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and resume and (ckpt / CHECKPOINT_JSON).exists():
        meta, tensors = load_checkpoint(ckpt)
        for k in ("seed", "grad_accum_steps", "max_grad_norm"):
            if meta["config"].get(k) != run_config[k]:
                raise ValueError(f"{ckpt}: checkpoint was trained with {k}={meta['config'].get(k)!r}, this run has "
                                 f"{run_config[k]!r}; resuming would not reproduce it (use resume=False or a new "
                                 "checkpoint_dir)")
        result = _restore(meta, tensors, model, optimizer, all_rngs, ckpt)
    elif eval_fn is not None:
        result.eval_loss.append((0, float(eval_fn(model))))

    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm  # imported here: only when a bar is wanted
        bar = tqdm(total=max_steps, initial=result.step, desc=desc, dynamic_ncols=True, leave=True)
    try:
        while result.step < max_steps:
            step = result.step                               # 0-based index of the update being made
            t0 = time.perf_counter()
            if lr_schedule is not None:
                optimizer.lr = optimizer.initial_lr * lr_schedule(step)
            model.zero_grad()
            losses = []
            for micro in range(grad_accum_steps):
                idx, targets = get_batch(batch_rng)
                _, loss = model(asarray(idx), asarray(targets))
                loss = float(loss)
                if not math.isfinite(loss):
                    raise ValueError(f"loss is {loss} at step {step} (micro-batch {micro}): training diverged; "
                                     "lower the learning rate or set max_grad_norm")
                losses.append(loss)
                model.backward()                             # accumulates into .grad
            if grad_accum_steps > 1:                         # sum of K gradients -> gradient of the mean loss
                for p in optimizer.params:
                    if p.grad is not None:
                        p.grad *= p.grad.dtype.type(1.0 / grad_accum_steps)
            record = {"step": step + 1, "loss": math.fsum(losses) / len(losses), "lr": optimizer.lr}
            if max_grad_norm is not None:
                record["grad_norm"] = clip_grad_norm_(optimizer.named_params, max_grad_norm, error_if_nonfinite=True)
                result.grad_norm.append(record["grad_norm"])
            optimizer.step()
            record["time"] = time.perf_counter() - t0
            result.step = step + 1
            result.train_loss.append(record["loss"])
            result.lr.append(record["lr"])
            result.step_time.append(record["time"])

            last = result.step == max_steps
            if eval_fn is not None and ((eval_every and result.step % eval_every == 0) or last):
                record["eval_loss"] = float(eval_fn(model))
                result.eval_loss.append((result.step, record["eval_loss"]))
                model.train()
            if ckpt is not None and ((checkpoint_every and result.step % checkpoint_every == 0) or last):
                save_checkpoint(ckpt, model, optimizer, result.step, all_rngs, result, run_config)
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
                if "eval_loss" in record:
                    post["eval"] = f"{record['eval_loss']:.4f}"
                bar.set_postfix(post, refresh=False)
            if log is not None:
                log(record)
    finally:
        if bar is not None:
            bar.close()
    return result
