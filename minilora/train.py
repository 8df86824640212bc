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
valid, and a truncated or altered tensor file is caught by its hash. checkpoint.json carries a digest of its own
content too, and every field is checked on load (step, history lengths, optimizer hyperparameters and step counts,
RNG states), so an edited or impossible checkpoint is a CorruptFileError, never a silently different run. Temporary
files a killed write left behind are removed by the next save or resume, and a fresh run (resume=False) never
replaces a committed checkpoint unless asked to (overwrite=True). Nothing is loaded with pickle, and nothing is read
through a symlink leading out of the checkpoint folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minilora.backend import asarray, default_rng, get_array_module, use_backend
from minilora.io import CorruptFileError, load_json, load_safetensors, save_json, save_safetensors
from minilora.optim.clip import clip_grad_norm_

CHECKPOINT_JSON = "checkpoint.json"
FORMAT = "minilora-checkpoint-v1"
# what a killed write leaves: the atomic writer's ".<file>.<8 random chars>.tmp" for the two checkpoint files
_ORPHAN = re.compile(r"\.(?:checkpoint\.json|step-\d{7}(?:\.b)?\.safetensors)\.[a-z0-9_]{8}\.tmp")


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
    d = _checkpoint_folder(checkpoint_dir)
    _remove_orphans(d)
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
    meta["meta_sha256"] = _meta_digest(meta)
    save_json(d / CHECKPOINT_JSON, meta)
    for old in d.glob("step-*.safetensors"):                 # only after the commit: the old files are now garbage
        if old.name != fname:
            old.unlink(missing_ok=True)


def _checkpoint_folder(checkpoint_dir) -> Path:
    d = Path(checkpoint_dir)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{d}: not a folder; checkpoint_dir names a folder for checkpoint files")
    return d


def _remove_orphans(d: Path) -> None:
    """Delete temporary files a killed checkpoint write left in `d` (only names of minilora's own temp pattern)."""
    if d.is_dir():
        for p in d.iterdir():
            if _ORPHAN.fullmatch(p.name) and not p.is_dir():
                p.unlink(missing_ok=True)


def _meta_digest(meta: dict) -> str:
    """SHA-256 of checkpoint.json's content without the digest itself (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _committed_tensor_file(d: Path):
    """The tensor file name the current checkpoint.json points to, or None (no checkpoint or an unreadable one)."""
    try:
        return load_json(d / CHECKPOINT_JSON).get("tensors")
    except (OSError, ValueError, AttributeError):
        return None


def load_checkpoint(checkpoint_dir) -> tuple[dict, dict]:
    """(meta, tensors) of the checkpoint in a folder; CorruptFileError when anything is missing or altered."""
    d = Path(checkpoint_dir)
    js = d / CHECKPOINT_JSON
    _check_inside(js, d)
    meta = load_json(js)
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{js}: not a {FORMAT} checkpoint (not a JSON object)")
    missing = [k for k in ("format", "step", "tensors", "sha256", "optimizer", "rng", "config", "history",
                           "meta_sha256") if k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise CorruptFileError(f"{js}: not a {FORMAT} checkpoint "
                               f"({'missing ' + str(missing) if missing else 'format ' + repr(meta.get('format'))})")
    if meta["meta_sha256"] != _meta_digest(meta):
        raise CorruptFileError(f"{js}: its content does not match the digest it was written with (meta_sha256): "
                               "the file was edited or is corrupt")
    _check_meta(meta, js)
    if not isinstance(meta["tensors"], str) or Path(meta["tensors"]).name != meta["tensors"]:
        raise CorruptFileError(f"{js}: tensor file {meta['tensors']!r} is not a file name in this folder")
    path = d / meta["tensors"]
    if not path.is_file():
        raise CorruptFileError(f"{js}: its tensor file {meta['tensors']} is missing")
    _check_inside(path, d)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != meta["sha256"]:
        raise CorruptFileError(f"{path}: SHA-256 {digest[:12]}... does not match {meta['sha256'][:12]}... recorded "
                               "in checkpoint.json: the file is truncated or corrupt")
    tensors, _ = load_safetensors(path)
    return meta, tensors


def _check_inside(path: Path, d: Path) -> None:
    if not path.resolve().is_relative_to(d.resolve()):
        raise CorruptFileError(f"{path}: a symlink to {path.resolve()}, outside the checkpoint folder {d}; only files "
                               "inside the folder are read")


def _is_int(v, low=0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(v, low=0.0, high=math.inf) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high


def _check_meta(meta: dict, js: Path) -> None:
    """Every field that decides the resumed run is one a run could have written; CorruptFileError otherwise."""
    def bad(what):
        raise CorruptFileError(f"{js}: {what}; no run writes such a checkpoint (edited or corrupt)")
    step = meta["step"]
    if not _is_int(step):
        bad(f"step {step!r} is not an integer >= 0")
    h = meta["history"]
    keys = ("train_loss", "lr", "grad_norm", "step_time", "eval_loss")
    if not isinstance(h, dict) or any(not isinstance(h.get(k), list) for k in keys):
        bad(f"history must hold the lists {list(keys)}")
    for k in ("train_loss", "lr", "step_time", "grad_norm"):
        if len(h[k]) != step and not (k == "grad_norm" and not h[k]):
            bad(f"history {k} has {len(h[k])} entries for step {step}")
        if not all(_is_number(v, -math.inf) for v in h[k]):
            bad(f"history {k} holds a value that is not a finite number")
    if not all(isinstance(e, list) and len(e) == 2 and _is_int(e[0]) and e[0] <= step and _is_number(e[1])
               for e in h["eval_loss"]):
        bad("history eval_loss must be [step, loss] pairs")
    om = meta["optimizer"]
    if not isinstance(om, dict) or not isinstance(om.get("hyperparams"), dict) or not isinstance(om.get("steps"),
                                                                                                     dict):
        bad("optimizer must hold hyperparams and steps")
    for k, v in om["hyperparams"].items():      # lr, eps, weight decay, momentum >= 0; betas in [0, 1); flags
        if not (isinstance(v, bool) or _is_number(v) or (isinstance(v, list) and v
                                                           and all(_is_number(b, 0.0, 1.0) and b < 1 for b in v))):
            bad(f"optimizer hyperparameter {k}={v!r} is not a finite number >= 0 (betas: in [0, 1))")
    if not _is_int(om.get("step_count")):
        bad(f"optimizer step_count {om.get('step_count')!r} is not an integer >= 0")
    wrong = {n: c for n, c in om["steps"].items() if not _is_int(c, 1) or c > om["step_count"]}
    if wrong:
        bad(f"optimizer step counts {wrong} are not integers in [1, step_count={om['step_count']}]")
    if not isinstance(meta["rng"], dict) or not isinstance(meta["config"], dict):
        bad("rng and config must be JSON objects")


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
        try:
            _set_rng_state(name, r, meta["rng"][name])
        except (TypeError, ValueError, KeyError) as e:
            raise CorruptFileError(f"{path / CHECKPOINT_JSON}: random generator {name!r} has a state this "
                                   f"generator cannot take ({type(e).__name__}: {e})") from None
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
          checkpoint_every: int = 0, resume: bool = True, overwrite: bool = False, seed: int = 0, rngs=None,
          config=None, progress: bool = True, desc: str = "train", log=None) -> TrainResult:
    """Train until `max_steps` optimizer steps are done; returns the TrainResult (history included on resume).

    get_batch(rng) -> (idx, targets): draws one micro-batch with the loop's host NumPy Generator.
    lr_schedule(step) -> multiplier of optimizer.initial_lr (see minilora.optim.schedule), or None for constant.
    eval_batches (fixed list of (idx, targets)) or eval_fn(model) -> float: run at step 0, every eval_every, the end.
    checkpoint_dir: resume from it if it holds a checkpoint (and resume=True), save there every checkpoint_every
    steps and at the end. A fresh run (resume=False) into a folder holding a checkpoint is refused unless
    overwrite=True: its first save then replaces the old checkpoint. rngs: extra named generators to checkpoint.
    config: JSON-able dict stored with it.
    log(record): called after every step with {"step", "loss", "lr", "time", ["grad_norm"], ["eval_loss"]}.
    """
    eval_fn = _check_args(max_steps, grad_accum_steps, eval_every, checkpoint_every, max_grad_norm, eval_batches,
                          eval_fn)
    ckpt = None if checkpoint_dir is None else _checkpoint_folder(checkpoint_dir)
    with use_backend("numpy"):                               # batches are sampled on the host, whatever the backend
        batch_rng = default_rng(seed)
    all_rngs = {"batch": batch_rng, **_model_rngs(model), **dict(rngs or {})}
    run_config = {"seed": seed, "grad_accum_steps": grad_accum_steps, "max_grad_norm": max_grad_norm,
                  **dict(config or {})}
    result = _resume_or_start(model, optimizer, ckpt, resume, overwrite, all_rngs, run_config, eval_fn)

    model.train()
    bar = _progress_bar(max_steps, result.step, desc) if progress else None
    try:
        while result.step < max_steps:
            record = _train_step(model, optimizer, get_batch, batch_rng, result, grad_accum_steps, max_grad_norm,
                                 lr_schedule)
            last = result.step == max_steps
            _maybe_eval(model, eval_fn, eval_every, result, record, last)
            _maybe_checkpoint(ckpt, checkpoint_every, model, optimizer, all_rngs, result, run_config, last)
            if bar is not None:
                _update_bar(bar, record)
            if log is not None:
                log(record)
    finally:
        if bar is not None:
            bar.close()
    return result


def _check_args(max_steps, grad_accum_steps, eval_every, checkpoint_every, max_grad_norm, eval_batches, eval_fn):
    """ValueError for impossible loop settings; returns the eval function (built from eval_batches if given)."""
    for name, v in (("max_steps", max_steps), ("grad_accum_steps", grad_accum_steps),
                    ("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "grad_accum_steps" else 0):
            raise ValueError(f"invalid {name} {v!r}: must be an integer >= {1 if name == 'grad_accum_steps' else 0}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"invalid max_grad_norm {max_grad_norm!r}: must be > 0 (or None for no clipping)")
    if eval_batches is not None and eval_fn is not None:
        raise ValueError("give eval_batches or eval_fn, not both")
    if eval_batches is None:
        return eval_fn
    eval_batches = list(eval_batches)
    if not eval_batches:
        raise ValueError("eval_batches is empty")
    return lambda m: evaluate(m, eval_batches)


def _resume_or_start(model, optimizer, ckpt, resume, overwrite, all_rngs, run_config, eval_fn) -> TrainResult:
    """Restore the checkpoint in `ckpt` (resume=True), or start at step 0 with its eval; a fresh start over a
    committed checkpoint needs overwrite=True."""
    committed = ckpt is not None and (ckpt / CHECKPOINT_JSON).exists()
    if committed and not resume and not overwrite:
        raise FileExistsError(f"{ckpt} holds a committed checkpoint (step {_committed_step(ckpt)}); a fresh run "
                              "(resume=False) would replace it at its first save. Pass resume=True to continue it, "
                              "overwrite=True to replace it, or choose a new checkpoint_dir")
    if ckpt is not None:
        _remove_orphans(ckpt)                                # what a killed write left behind
    if committed and resume:
        meta, tensors = load_checkpoint(ckpt)
        for k in ("seed", "grad_accum_steps", "max_grad_norm"):
            if meta["config"].get(k) != run_config[k]:
                raise ValueError(f"{ckpt}: checkpoint was trained with {k}={meta['config'].get(k)!r}, this run has "
                                 f"{run_config[k]!r}; resuming would not reproduce it. Use the same {k}, or start "
                                 "a new run in a new checkpoint_dir (or with resume=False, overwrite=True to "
                                 "replace this checkpoint)")
        return _restore(meta, tensors, model, optimizer, all_rngs, ckpt)
    result = TrainResult()
    if eval_fn is not None:
        result.eval_loss.append((0, float(eval_fn(model))))
    return result


def _committed_step(d: Path):
    try:
        return load_json(d / CHECKPOINT_JSON).get("step", "?")
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def _train_step(model, optimizer, get_batch, batch_rng, result, grad_accum_steps, max_grad_norm, lr_schedule):
    """One optimizer step over grad_accum_steps micro-batches; appends to `result` and returns the step's record."""
    step = result.step                                       # 0-based index of the update being made
    t0 = time.perf_counter()
    if lr_schedule is not None:
        optimizer.lr = optimizer.initial_lr * lr_schedule(step)
    model.zero_grad()
    losses = []
    for micro in range(grad_accum_steps):
        idx, targets = get_batch(batch_rng)
        if getattr(idx, "size", 1) == 0:
            raise ValueError(f"get_batch returned an empty batch (shape {tuple(idx.shape)}) at step {step} "
                             f"(micro-batch {micro}); a batch needs at least one sequence of at least one token")
        _, loss = model(asarray(idx), asarray(targets))
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"loss is {loss} at step {step} (micro-batch {micro}): training diverged; "
                             "lower the learning rate or set max_grad_norm")
        losses.append(loss)
        model.backward()                                     # accumulates into .grad
    if grad_accum_steps > 1:                                 # sum of K gradients -> gradient of the mean loss
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
    return record


def _maybe_eval(model, eval_fn, eval_every, result, record, last) -> None:
    """Evaluate every eval_every steps and at the end (back in training mode afterwards)."""
    if eval_fn is not None and ((eval_every and result.step % eval_every == 0) or last):
        record["eval_loss"] = float(eval_fn(model))
        result.eval_loss.append((result.step, record["eval_loss"]))
        model.train()


def _maybe_checkpoint(ckpt, checkpoint_every, model, optimizer, all_rngs, result, run_config, last) -> None:
    """Save a checkpoint every checkpoint_every steps and at the end."""
    if ckpt is not None and ((checkpoint_every and result.step % checkpoint_every == 0) or last):
        save_checkpoint(ckpt, model, optimizer, result.step, all_rngs, result, run_config)


def _progress_bar(max_steps, initial, desc):
    from tqdm.auto import tqdm  # imported here: only when a bar is wanted
    return tqdm(total=max_steps, initial=initial, desc=desc, dynamic_ncols=True, leave=True)


def _update_bar(bar, record) -> None:
    bar.update(1)
    post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
    if "eval_loss" in record:
        post["eval"] = f"{record['eval_loss']:.4f}"
    bar.set_postfix(post, refresh=False)
