# %% [markdown]
# # 13 · LoRA among other PEFT methods: the last layer, adapter layers and prefix tuning
#
# **The idea in one sentence:** every parameter-efficient method trains a small set of numbers, but they differ in
# where those numbers sit, which decides what they cost at inference: LoRA can be merged away, adapter layers add
# sequential work to every token, prefix tuning takes positions from the context, and the last layer alone learns
# little.
#
# **After this notebook you can**
# - count the trainable parameters of LoRA, adapter layers, prefix tuning and last-layer tuning, for the tiny GPT
#   and for LLaMA-7B;
# - compute the extra inference work per token of each method, and say which can be removed by merging;
# - measure the forward time of the tiny GPT with merged and unmerged LoRA and with adapter layers;
# - train the last-layer baseline against LoRA and read the difference with a standard error.
#
# **Prerequisites:** notebooks 01 (LoRA), 05 (merging) and 06 (fine-tuning the shipped base). **Time:** about 40
# minutes (the cells run in about ten seconds).
#
# The four methods, each on a frozen pretrained model:
#
# | method | what is trained | paper |
# |---|---|---|
# | last layer | the output head only | (the classic baseline) |
# | adapter layers | a bottleneck MLP $d \to m \to d$ with a residual, after attention and MLP | arXiv 1902.00751 |
# | prefix tuning | $p$ learned key and value vectors per layer, attended to by every token | arXiv 2101.00190 |
# | LoRA | $\Delta W = BA$ on chosen linear layers | arXiv 2106.09685 |
#
# (Adapter layers: Houlsby et al., 2019; prefix tuning: Li & Liang, 2021; LoRA: Hu et al., 2021.)

# %%
# %matplotlib inline
import platform
import time

import numpy as np

import minilora
from minilora import memory
from minilora.backend import asarray, default_rng, to_numpy
from minilora.data import LN2, load_corpus
from minilora.nn import GELU, Linear, Module
from minilora.optim import AdamW, get_constant_schedule_with_warmup
from minilora.peft import LoraConfig, get_peft_model
from minilora.pretrained import eval_batches, load_base
from minilora.train import train

print(f"python {platform.python_version()} | numpy {np.__version__} | minilora {minilora.__version__} "
      f"| backend {minilora.get_backend()}")
SEED = 0

# %% [markdown]
# ## 1. Parameter counts, by formula
#
# For a model with $L$ blocks of width $d$ (MLP width $d_{ff}$, vocabulary $V$):
#
# * **LoRA** on a $d_{in}\times d_{out}$ layer trains $r(d_{in}+d_{out})$; on $W_q, W_v$ of every block that is
#   $2L\cdot2dr$, on all linear layers it is the sum over them;
# * **adapter layers**, two per block with bottleneck $m$, each $d\cdot m + m$ (down) plus $m\cdot d + d$ (up):
#   $2L(2dm + m + d)$;
# * **prefix tuning** with $p$ positions trains one key and one value vector of width $d$ per position and layer:
#   $2Lpd$ (the paper trains them through a small MLP that is thrown away afterwards; we count what is kept);
# * **last layer**: the output head, $dV$.
#
# We compare them at settings people use: LoRA $r = 8$ (on $W_q, W_v$ at 7B; on the tiny GPT, whose $q, k, v$ are
# one fused `c_attn` layer, on that layer), adapters $m = 64$ at 7B and $m = 16$ on the tiny GPT, prefix $p = 16$.

# %%
base, meta = load_base()
cfg = meta["config"]
tiny = memory.ModelShape("tiny-gpt", n_layer=cfg["n_layer"], d_model=cfg["n_embd"], n_head=cfg["n_head"],
                         d_ff=4 * cfg["n_embd"], vocab_size=cfg["vocab_size"], mlp="gelu", fused_qkv=True)
llama = memory.get_shape("llama-7b")


def counts(shape, m, p=16, r=8):
    L, d = shape.n_layer, shape.d_model
    attn = "c_attn" if shape.fused_qkv else "q,v"               # the tiny GPT fuses q, k, v into one c_attn
    return {"LoRA r=8 attention": memory.lora_trainable_params(shape, r, targets=attn),
            "LoRA r=8 all linear": memory.lora_trainable_params(shape, r, targets="all-linear"),
            "adapters, 2 per block": 2 * L * (2 * d * m + m + d),
            f"prefix p={p}": 2 * L * p * d,
            "last layer (head)": d * shape.vocab_size}


c_tiny = counts(tiny, m=16)
c_7b = counts(llama, m=64)
n_tiny, n_7b = base.get_num_params(), memory.param_counts(llama)["total"]
print(f"{'method':<28} {'tiny GPT':>10} {'%':>7} {'LLaMA-7B':>14} {'%':>8}")
for (name, a), b in zip(c_tiny.items(), c_7b.values(), strict=True):
    print(f"{name:<28} {a:>10,} {100 * a / n_tiny:>6.2f}% {b:>14,} {100 * b / n_7b:>7.3f}%")
assert c_7b["LoRA r=8 attention"] == 4_194_304 and c_7b["prefix p=16"] == 4_194_304
assert round(c_7b["adapters, 2 per block"] / c_7b["LoRA r=8 attention"]) == 8
assert c_7b["last layer (head)"] == 131_072_000 and c_tiny["last layer (head)"] == 32_768

# %% [markdown]
# At 7B, LoRA $r = 8$ on $W_q, W_v$ and prefix tuning with 16 positions train exactly the same number of parameters
# (4,194,304: both are $2L\cdot16d$), and adapters with $m = 64$ train about eight times more. The output head alone
# is 131 M parameters at 7B (its vocabulary is 32,000 wide), far more than any of the others: "train only the last
# layer" is not even cheap at this scale. On the tiny GPT the picture is different because its vocabulary is only
# 256 bytes. Parameter counts alone do not separate the methods; what they cost at inference does.
#
# We check two of the formulas against real modules: LoRA through `get_peft_model`, and adapter layers through a
# small module built from minilora's `Linear` and `GELU` that wraps each block's output projections. Batches are
# sampled on the host; on a GPU backend they enter the model through `asarray`, and results come back to host NumPy
# through `to_numpy` (notebook 09 shows why, with the strict backend that checks it on a CPU).

# %%
class Adapter(Module):
    """Houlsby-style adapter after a frozen linear: y = base(x); y + up(gelu(down(y))). `up` starts at zero."""

    def __init__(self, base_layer, m, rng):
        super().__init__()
        d = base_layer.weight.shape[0]
        self.base_layer = base_layer
        self.down, self.act, self.up = Linear(d, m, rng=rng), GELU(), Linear(m, d, rng=rng)
        self.up.weight.data[...] = 0                          # like LoRA's B = 0: the model starts unchanged
        self.up.bias.data[...] = 0

    def forward(self, x):
        y = self.base_layer(x)
        return y + self.up(self.act(self.down(y)))


def with_adapters(model, m):
    rng = default_rng(SEED)
    for block in model.transformer.h:
        block.attn.c_proj = Adapter(block.attn.c_proj, m, rng)
        block.mlp.c_proj = Adapter(block.mlp.c_proj, m, rng)
    return model


def adapter_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if ".down." in n or ".up." in n)


lora_tiny = get_peft_model(load_base()[0], LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                           rng=default_rng(SEED))
adapted = with_adapters(load_base()[0], 16)
print(f"LoRA all linear, counted by PEFT: {lora_tiny.get_nb_trainable_parameters()[0]:,}")
print(f"adapters m=16, counted on the module: {adapter_params(adapted):,}")
idx = asarray(load_corpus("stdlib").get_batch("val", 1, 64, np.random.default_rng(SEED))[0])  # (1, 64) bytes
same = np.abs(adapted(idx)[0] - base(idx)[0]).max()
print(f"max |logits(adapters at init) - logits(base)| = {same}")
assert lora_tiny.get_nb_trainable_parameters()[0] == c_tiny["LoRA r=8 all linear"]
assert adapter_params(adapted) == c_tiny["adapters, 2 per block"] and same == 0

# %% [markdown]
# ## 2. What each method costs at inference, per token
#
# A forward pass of a dense model costs about $2N$ floating-point operations per token for its $N$ linear weights.
# On top of that:
#
# * **LoRA, merged**: nothing. $W_0 + sBA$ is one matrix of the original shape (notebook 05 §6).
# * **LoRA, unmerged** (when several adapters are served from one base): $2r(d_{in}+d_{out})$ per adapted layer.
# * **adapter layers**: $2(2dm)$ per adapter, and they *cannot* be merged: the nonlinearity sits between down and
#   up. Their cost is also sequential: each adapter is a small matmul that must wait for the layer before it,
#   which is why the LoRA paper (§3, Table 1) measures adapters adding noticeable latency at batch size 1, where a
#   GPU is limited by the number of sequential steps rather than by arithmetic.
# * **prefix tuning**: each token attends to $p$ more keys and values, $2\cdot2pd$ per layer, and the $p$ positions
#   are taken from the model's context window: with a window of $n$ positions only $n - p$ remain for the input
#   (LoRA paper, §3).

# %%
def extra_flops(shape, m=64, p=16, r=8):
    L, d = shape.n_layer, shape.d_model
    dense = 2 * memory.param_counts(shape)["linear"]
    lora_qv = 2 * memory.lora_trainable_params(shape, r, targets="q,v")
    return dense, {"LoRA merged": 0, "LoRA r=8 q,v unmerged": lora_qv,
                   f"adapters m={m}": 2 * L * 2 * (2 * d * m), f"prefix p={p}": L * 2 * 2 * p * d}


dense, extra = extra_flops(llama)
print(f"LLaMA-7B dense linear FLOPs per token: {dense / 1e9:.2f} GFLOP")
for name, f in extra.items():
    print(f"{name:<24} +{f / 1e6:8.2f} MFLOP per token ({100 * f / dense:.3f} %)")
print(f"prefix p=16 in a 2,048-position window leaves {2048 - 16:,} positions for the input")
assert round(dense / 1e9, 2) == 12.95 and extra["LoRA merged"] == 0
assert extra["LoRA r=8 q,v unmerged"] == extra["prefix p=16"]
assert round(100 * extra["prefix p=16"] / dense, 3) == 0.065 and round(100 * extra["adapters m=64"] / dense, 2) == 0.52
assert extra["adapters m=64"] == 8 * extra["LoRA r=8 q,v unmerged"]

# %% [markdown]
# In FLOPs every method is cheap: at most about half a percent (adapters, 0.52 %) of the dense model's 12.95 GFLOP
# per token, and unmerged LoRA and the prefix add 0.065 % each.
# Arithmetic is not what separates them; *sequential steps that cannot be removed* are. LoRA can be merged to zero
# extra work; adapters cannot; prefix tuning's cost is attention over extra positions and a shorter usable window.
#
# ## 3. Measured on the tiny GPT
#
# Forward time of one sequence of 64 bytes, best of 30 runs each: the base, LoRA merged into the weights
# (`merge_and_unload`), LoRA unmerged, and adapter layers. On a CPU with NumPy every extra matmul is a separate call
# with its own overhead, which is the small-scale version of the sequential-steps effect. The numbers depend on the
# machine and its load; the ordering is what to look at.

# %%
def best_ms(models, reps=30):
    """Best-of-reps forward time in ms for each model, measured round-robin so that load spikes hit all alike."""
    best = {name: np.inf for name in models}
    for m in models.values():
        m.eval()
        m(idx)                                                 # warm-up
    for _ in range(reps):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(idx)
            best[name] = min(best[name], 1000 * (time.perf_counter() - t0))
    return best


rng = default_rng(SEED)                                         # on the backend: B's values are drawn where B lives
for _name, mod in lora_tiny.named_modules():                    # give B non-zero values, so merging is a real test
    if hasattr(mod, "lora_B"):
        w = mod.lora_B["default"].weight.data
        w[...] = 0.01 * rng.standard_normal(w.shape).astype(w.dtype)
unmerged_logits = lora_tiny(idx)[0]
merged = get_peft_model(load_base()[0], LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                        rng=default_rng(SEED))
for (_, a), (_, b) in zip(merged.named_parameters(), lora_tiny.named_parameters(), strict=True):
    a.data[...] = b.data                                        # the same adapter weights ...
merged = merged.merge_and_unload()                              # ... folded into W0
timed = best_ms({"base": base, "LoRA merged": merged, "LoRA unmerged": lora_tiny, "adapters m=16": adapted})
for name, ms in timed.items():
    print(f"{name:<16} {ms:6.2f} ms per forward ({ms / timed['base']:.2f}x the base)")
diff_merged = np.abs(merged(idx)[0] - unmerged_logits).max()
print(f"max |logits(merged) - logits(unmerged)| = {diff_merged:.1e} (B non-zero)")
assert diff_merged < 1e-4

# %% [markdown]
# A merged LoRA model runs the same code as the base, so it costs the same up to timing noise; the unmerged adapter
# and the adapter layers add work on every call.
#
# ## 4. The last-layer baseline against LoRA
#
# The simplest way to fine-tune few parameters is to train only the output head. We train it and LoRA ($r = 8$,
# all linear layers) for 40 steps on standard-library code with the same batches and AdamW at $10^{-3}$, and score
# both on 48 held-out windows of code and of the pretraining docs (paired standard errors, as in notebook 12).

# %%
code, docs = load_corpus("stdlib"), load_corpus("pydoc")
code_eval, docs_eval = eval_batches(code, 64, 48), eval_batches(docs, 64, 48)


def per_window_bits(model, batches):
    """(n_windows,) mean loss of each window in bits per byte, in eval mode."""
    model.eval()
    out = []
    for x, y in batches:
        logits = to_numpy(model(asarray(x))[0]).astype(np.float64)                  # (b, T, 256)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        out.append(-np.take_along_axis(logp, y[..., None], -1)[..., 0].mean(1))     # (b,)
    model.train(True)
    return np.concatenate(out) / LN2


def finetune(model):
    opt = AdamW(model.named_parameters(), lr=1e-3, weight_decay=0.0)
    train(model, opt, lambda rng: code.get_batch("train", 4, 64, rng), max_steps=40, max_grad_norm=1.0,
          lr_schedule=get_constant_schedule_with_warmup(4), seed=SEED, progress=False)
    return per_window_bits(model, code_eval), per_window_bits(model, docs_eval)


base_c, base_d = per_window_bits(base, code_eval), per_window_bits(base, docs_eval)
head_only = load_base()[0]
for name, p in head_only.named_parameters():
    p.requires_grad = name.startswith("lm_head")
n_head = sum(p.numel() for p in head_only.parameters() if p.requires_grad)
results = {"last layer": finetune(head_only),
           "LoRA r=8 all linear": finetune(get_peft_model(load_base()[0], LoraConfig(r=8, lora_alpha=16,
                                                          target_modules="all-linear"), rng=default_rng(SEED)))}
print(f"{'method':<22} {'code gain':>16} {'docs rise':>16}   (bits/byte, ± paired SE over 48 windows)")
se = {}
for name, (c, d) in results.items():
    g, f = base_c - c, d - base_d
    se[name] = (g.mean(), f.mean())
    print(f"{name:<22} {g.mean():>9.3f} ± {g.std(ddof=1) / np.sqrt(48):.3f} "
          f"{f.mean():>9.3f} ± {f.std(ddof=1) / np.sqrt(48):.3f}")
gap = results["last layer"][0] - results["LoRA r=8 all linear"][0]
print(f"LoRA's code loss is lower by {gap.mean():.3f} ± {gap.std(ddof=1) / np.sqrt(48):.3f} bits/byte "
      f"(last layer trains {n_head:,} parameters, LoRA {c_tiny['LoRA r=8 all linear']:,})")
assert n_head == 32_768
assert {k: tuple(round(float(v), 3) for v in x) for k, x in se.items()} == {
    "last layer": (0.130, 0.068), "LoRA r=8 all linear": (0.185, 0.172)}
assert round(gap.mean(), 3) == 0.055 and gap.mean() > 2.5 * gap.std(ddof=1) / np.sqrt(48)

# %% [markdown]
# Training only the head gains 0.130 bits/byte on code, LoRA on every linear layer 0.185: LoRA's code loss ends
# 0.055 bits/byte lower, almost three paired standard errors. The head also forgets much less (0.068 against 0.172
# on the docs), but, as notebook 12 shows, less learning usually comes with less forgetting; comparing the two at
# equal gain is the fair test (exercise 3). The head can only re-weight the features the frozen blocks already
# compute; adapters anywhere inside the network can change the features themselves.
#
# ## Recap
#
# - All four methods train a small fraction of a 7B model, but not the same fraction: LoRA $r = 8$ on $W_q, W_v$ and
#   prefix tuning with 16 positions train 4,194,304 parameters each, adapters with $m = 64$ about eight times more,
#   and the output head alone 131 M.
# - In FLOPs none costs more than about half a percent at inference; what separates them is structure. Merged LoRA
#   costs nothing; adapter layers add sequential work that cannot be merged; prefix tuning attends to extra
#   positions and takes them from the context window.
# - Merging is exact up to float32 rounding, and the merged model runs at the base's speed.
# - The last-layer baseline learns clearly less than LoRA on a new domain (0.055 bits/byte, about three standard
#   errors), and forgets less.
#
# ## Exercises
#
# 1. At which bottleneck $m$ do adapter layers on LLaMA-7B train as many parameters as LoRA $r = 8$ on all linear
#    layers? Compute it from the formulas, then check with the `counts` function.
# 2. Extend `extra_flops` with the per-token cost of LoRA $r = 8$ on all linear layers, unmerged. At which rank does
#    it reach 1 % of the dense FLOPs?
# 3. Train the last layer and LoRA with checkpoints, as in notebook 12 §5, and compare their forgetting at equal
#    gain on code. Does the head still forget less?
# 4. Time the four models with a batch of 16 sequences instead of one. Do the ratios to the base shrink or grow,
#    and why?
