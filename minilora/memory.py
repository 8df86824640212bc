"""Memory calculator: how many bytes full fine-tuning, LoRA and QLoRA need, category by category.

Pure Python arithmetic (no arrays), so it runs for a 175B model in microseconds. Every number below is an
assumption you can change with a keyword argument; `minilora memory --explain` prints this docstring.

Parameters (ModelShape; LLaMA and GPT-3 use their published shapes)
    per block:  attention  q, k, v, o: 4·d²         (or one fused c_attn d→3d plus c_proj d→d, same count)
                MLP        SwiGLU (LLaMA): gate, up, down = 3·d·f      GELU (GPT): c_fc, c_proj = 2·d·f
                norms      2 per block: d each (RMSNorm, or LayerNorm without bias) or 2d (LayerNorm weight + bias)
                biases     d_out per linear if shape.bias (GPT-2/3, minilora's GPT); none in LLaMA
    outside:    token embedding V·d (+ learned positions P·d for GPT), final norm, lm_head V·d unless tied.
    LoRA on a d_in→d_out linear adds A (r, d_in) and B (d_out, r): r·(d_in + d_out) trainable parameters.
    PEFT's "all-linear" = every linear inside the blocks, not lm_head.

Bytes per value (defaults)
    full    16-bit weights (2 B) + 16-bit gradients (2 B) + fp32 Adam m and v (4 + 4 B) = 12 B/param.
            No fp32 master copy: 12 B/param is what makes LLaMA-65B come to 783 GB, the QLoRA paper's "> 780 GB".
            master_weights=True adds the fp32 master copy of mixed-precision Adam (16 B/param: 1,045 GB at 65B).
    lora    frozen 16-bit base (2 B/param, no gradient, no optimizer state); adapters in 16-bit (2 B, as qlora.py
            casts them to bf16 and as the LoRA paper's 35 MB checkpoint counts them), their 16-bit gradients (2 B)
            and fp32 AdamW m, v (8 B) per adapter parameter.
    qlora   every linear inside the blocks stored as NF4: 4-bit codes packed two per byte + blockwise constants.
            bits/param = 4 + 32/64 = 4.5 without double quantization; with it (paper §3) the 64-blocks' absmax
            are 8-bit codes plus one fp32 absmax2 per 256 blocks: 4 + 8/64 + 32/(64·256) = 4.127. Per tensor add
            the 16-entry fp32 NF4 table and, with DQ, the fp32 offset; once per model DQ's 256-entry fp32 map.
            Embeddings, norms and lm_head stay in 16-bit (upcast_non_quantized=True: fp32, as PEFT's
            prepare_model_for_kbit_training does). Adapters, gradients, optimizer as for lora; the optimizer is
            bitsandbytes' paged AdamW 32-bit: its fp32 states are counted on the GPU here, because paging only
            evicts them to CPU RAM when a spike would otherwise run out of memory.
    optim_bits=8   bitsandbytes' (paged) AdamW8bit (Dettmers et al. 2021, arXiv 2110.02861): m and v as 1-byte
            codes plus one fp32 absmax per block of 256 each: 2 + 2·4/256 = 2.03 B per trainable parameter instead
            of 8 (tensors under min_8bit_size = 4096 elements keep fp32 states). 65B QLoRA: 6.40 GB -> 1.62 GB.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
arXiv 2205.05198, §4 "Activation Memory")
    one block keeps  s·b·d·(34 + 5·a·s/d)  bytes  (16-bit activations, dropout masks, no tensor parallelism;
    s = seq_len, b = batch_size, d = d_model, a = n_heads; the 5·a·s² part is attention scores/softmax/dropout).
    It is derived for a GPT block with a 4d GELU MLP; for LLaMA's SwiGLU it is an approximation. Read as
    16 values of s·b·d and 2 of a·s²·b at 2 bytes, plus 1-byte dropout masks (2·s·b·d + a·s²·b), it generalises to
    other widths: float32 without dropout (minilora's NumPy GPT) keeps 64·s·b·d + 8·a·s²·b.
    outside the blocks: 5·s·b·d (embedding dropout mask, final norm and lm_head inputs) + 4·s·b·V (fp32 logits kept
                        for the cross-entropy), the same paper's terms for the input and output layers.
    no checkpointing:   n_layer · block + outside
    checkpointing:      n_layer · 2·s·b·d (each block's 16-bit input) + one block recomputed in the backward + outside
    The same formula is used for every method: a frozen base still stores what the backward needs to reach the
    adapters of the lower blocks. Not modelled: CUDA context, allocator fragmentation, temporary buffers.

Defaults per method (METHOD_DEFAULTS; any of them can be overridden)
    lora    r=8 on q, v, no checkpointing: PEFT LoraConfig's r and its LLaMA target_modules (q_proj, v_proj).
    qlora   r=64 on all linear layers, gradient checkpointing: qlora.py and the Guanaco scripts.
    all     seq_len 512, batch_size 1 (the papers give no single setting; choose yours with --seq-len/--batch-size).

Units: GB = 1e9 bytes (the papers' unit); MiB = 2**20 bytes.
"""
from __future__ import annotations

import dataclasses
import math

from minilora.units import GB, MiB, fmt_bytes  # noqa: F401 - MiB stays importable from here (notebook 08)


# ---------------------------------------------------------------------------------------------------- model shapes
@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape: enough to count every parameter and every activation byte."""
    name: str
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    vocab_size: int
    mlp: str = "swiglu"              # "swiglu" (gate, up, down: LLaMA) or "gelu" (c_fc, c_proj: GPT)
    norm: str = "rmsnorm"            # "rmsnorm" (weight only) or "layernorm" (weight + bias)
    tied_embeddings: bool = False    # lm_head shares the token embedding (GPT-2/3) or not (LLaMA, minilora's GPT)
    n_positions: int = 0             # learned position embeddings (GPT); 0 for RoPE (LLaMA)
    bias: bool = False               # biases on the linear layers
    fused_qkv: bool = False          # one c_attn d→3d (nanoGPT / minilora) instead of q, k, v

    def __post_init__(self):
        for f in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ValueError(f"ModelShape.{f} must be a positive int, got {getattr(self, f)!r}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"ModelShape.mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"ModelShape.norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"ModelShape.d_model {self.d_model} must be divisible by n_head {self.n_head} "
                             "(each head gets d_model / n_head dimensions)")


def _llama(name, n_layer, d, n_head, d_ff):
    return ModelShape(name, n_layer, d, n_head, d_ff, vocab_size=32000)


MODELS = {
    "llama-7b": _llama("llama-7b", 32, 4096, 32, 11008),
    "llama-13b": _llama("llama-13b", 40, 5120, 40, 13824),
    "llama-33b": _llama("llama-33b", 60, 6656, 52, 17920),
    "llama-65b": _llama("llama-65b", 80, 8192, 64, 22016),
    # GPT-3 175B (Brown et al. 2020, Table 2.1): 96 layers, d 12288, 96 heads, 4d GELU MLP, GPT-2 BPE vocab,
    # 2048 learned positions, tied embeddings, biases, LayerNorm.
    "gpt3-175b": ModelShape("gpt3-175b", 96, 12288, 96, 4 * 12288, 50257, mlp="gelu", norm="layernorm",
                            tied_embeddings=True, n_positions=2048, bias=True),
}
ALIASES = {"llama-30b": "llama-33b", "gpt-3-175b": "gpt3-175b", "gpt3": "gpt3-175b", "gpt-3": "gpt3-175b"}


def get_shape(model) -> ModelShape:
    """A ModelShape from a known name (case-insensitive) or a ModelShape passed through."""
    if isinstance(model, ModelShape):
        return model
    key = str(model).lower()
    key = ALIASES.get(key, key)
    if key not in MODELS:
        raise KeyError(f"unknown model {model!r}; known models: {', '.join(MODELS)} "
                       f"(aliases: {', '.join(ALIASES)}), or pass a ModelShape")
    return MODELS[key]


def block_linears(shape: ModelShape) -> dict:
    """Every linear layer of one block: module name -> (d_in, d_out), named as in HF LLaMA / nanoGPT."""
    d, f = shape.d_model, shape.d_ff
    if shape.fused_qkv:
        lin = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d)}
    else:
        lin = {f"self_attn.{p}_proj": (d, d) for p in "qkvo"}
    if shape.mlp == "swiglu":
        lin.update({"mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)})
    else:
        lin.update({"mlp.c_fc": (d, f), "mlp.c_proj": (f, d)})
    return lin


def param_counts(shape: ModelShape) -> dict:
    """Parameter counts by group: 'linear' (block linears' weights, the part QLoRA quantizes) and 'other'."""
    d, L = shape.d_model, shape.n_layer
    lin = block_linears(shape).values()
    linear = L * sum(i * o for i, o in lin)
    norm = 2 * d if (shape.norm == "layernorm" and shape.bias) else d    # LayerNorm has a bias only if shape.bias
    bias = L * sum(o for _, o in lin) if shape.bias else 0
    embed = shape.vocab_size * d + shape.n_positions * d
    lm_head = 0 if shape.tied_embeddings else shape.vocab_size * d
    other = bias + L * 2 * norm + norm + embed + lm_head
    return {"linear": linear, "biases": bias, "norms": L * 2 * norm + norm, "embeddings": embed,
            "lm_head": lm_head, "other": other, "total": linear + other}


# ----------------------------------------------------------------------------------------------------- LoRA counts
_SHORT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
          "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def resolve_targets(shape: ModelShape, targets) -> list:
    """Module names LoRA adapts. targets: "all-linear", a comma string "q,v", or a list; short names q/k/v/o/
    gate/up/down expand to q_proj, ...; a name matches a module if equal to it or to its last dotted parts (PEFT)."""
    names = list(block_linears(shape))
    if isinstance(targets, str):
        if targets.strip().lower() in ("all-linear", "all_linear", "all"):
            return names
        targets = [t for t in targets.split(",") if t.strip()]
    wanted = [_SHORT.get(t.strip(), t.strip()) for t in targets]
    if not wanted:
        raise ValueError("targets is empty; give e.g. 'q,v' or 'all-linear'")
    chosen = []
    for t in wanted:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(f"target {t!r} matches no linear layer of {shape.name}; "
                             f"its layers are: {', '.join(names)}")
        chosen += [h for h in hits if h not in chosen]
    return [n for n in names if n in chosen]         # block order, no duplicates


def lora_trainable_params(model, r: int, targets="q,v") -> int:
    """Σ over adapted linears of r·(d_in + d_out), times n_layer (LoRA paper §4.2: 2·L̂·d_model·r for square W)."""
    shape = get_shape(model)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    lin = block_linears(shape)
    names = resolve_targets(shape, targets)
    name = min(names, key=lambda n: min(lin[n]))
    if r > min(lin[name]):         # B·A of an (d_out, r)·(r, d_in) product has rank <= min(d_in, d_out) anyway
        raise ValueError(f"LoRA rank r={r} is larger than min(d_in, d_out) = {min(lin[name])} of the targeted layer "
                         f"{name} ({lin[name][0]} -> {lin[name][1]}); choose r <= {min(lin[name])}")
    return shape.n_layer * sum(r * (lin[n][0] + lin[n][1]) for n in names)


def adam_state_bytes(sizes, optim_bits: int = 32, min_8bit_size: int = 4096) -> int:
    """Bytes of Adam's m and v for trainable tensors of the given element counts: 8 B each at optim_bits=32; at 8
    (bnb's AdamW8bit) 2 B of codes + 2 fp32 absmax per block of 256, and 8 B for tensors under min_8bit_size."""
    if optim_bits not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32 (bitsandbytes' AdamW8bit or AdamW), got {optim_bits!r}")
    if optim_bits == 32:
        return sum(8 * int(n) for n in sizes)
    return sum(8 * n if n < min_8bit_size else 2 * n + 8 * -(-n // 256) for n in map(int, sizes))


def square_layer_lora_params(n_params: float, r: int) -> float:
    """Treat a whole model of N parameters as one √N × √N matrix: LoRA adds A and B, 2·√N·r parameters."""
    return 2.0 * math.sqrt(n_params) * r


# --------------------------------------------------------------------------------------------- 4-bit storage cost
def bits_per_param(blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256, bits: int = 4) -> float:
    """Asymptotic storage of blockwise 4-bit quantization (QLoRA paper §3): 4 + 32/64 = 4.5, with DQ 4.127."""
    if double_quant:
        return bits + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return bits + 32 / blocksize


def nf4_tensor_bytes(n: int, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> dict:
    """Exact bytes of one NF4 tensor of n values as bitsandbytes stores it (Params4bit + QuantState).

    codes: ceil(n/2) uint8 (two per byte); absmax: ceil(n/blocksize) fp32, or with DQ the same count of uint8
    codes + ceil(n_blocks/nested_blocksize) fp32 absmax2 + one fp32 offset; nf4_table: the 16-entry fp32 table that
    quantize_4bit creates per call. DQ's 256-entry fp32 dynamic map is shared by all tensors (bnb caches it in
    name2qmap), so `estimate` adds it once per model, not here."""
    n_blocks = -(-n // blocksize)
    if double_quant:
        stats = {"absmax": n_blocks, "absmax2": 4 * -(-n_blocks // nested_blocksize), "offset": 4}
    else:
        stats = {"absmax": 4 * n_blocks}
    return {"codes": -(-n // 2), **stats, "nf4_table": 16 * 4}


# ---------------------------------------------------------------------------------------------------- activations
def activation_bytes(model, seq_len: int, batch_size: int, gradient_checkpointing: bool = False,
                     bytes_per_value: int = 2, dropout: bool = True) -> dict:
    """Activation bytes kept for the backward (Korthikanti et al. 2022), split into parts; see the module docstring.

    Their 34·s·b·d + 5·a·s²·b is 16 values of s·b·d and 2 of a·s²·b per block at 2 bytes each, plus 1-byte dropout
    masks (2·s·b·d + a·s²·b). bytes_per_value=4, dropout=False gives the same count for a float32 model without
    dropout, such as minilora's NumPy GPT: 64·s·b·d + 8·a·s²·b."""
    shape = get_shape(model)
    s, b, d, a = seq_len, batch_size, shape.d_model, shape.n_head
    if s <= 0 or b <= 0:
        raise ValueError(f"seq_len and batch_size must be positive, got seq_len={s}, batch_size={b}")
    per_block = bytes_per_value * (16 * s * b * d + 2 * a * s * s * b)   # kept exact in integers
    if dropout:
        per_block += 2 * s * b * d + a * s * s * b                        # uint8 masks
    out = {"per_block": per_block, "logits": 4 * s * b * shape.vocab_size,
           "head": 2 * bytes_per_value * s * b * d + (s * b * d if dropout else 0)}   # ln_f, lm_head inputs; mask
    if gradient_checkpointing:
        out["checkpoints"] = shape.n_layer * bytes_per_value * s * b * d
        out["blocks"] = per_block                     # only one block's activations are alive at a time
    else:
        out["checkpoints"] = 0
        out["blocks"] = shape.n_layer * per_block
    out["total"] = out["blocks"] + out["checkpoints"] + out["head"] + out["logits"]
    return out


# ------------------------------------------------------------------------------------------------------- estimate
CATEGORIES = ("weights", "adapters", "gradients", "optimizer_states", "activations")
METHOD_DEFAULTS = {   # (r, targets, gradient_checkpointing): PEFT LoraConfig defaults; qlora.py's recipe
    "full": (None, None, False),
    "lora": (8, "q,v", False),
    "qlora": (64, "all-linear", True),
}


@dataclasses.dataclass
class MemoryEstimate:
    model: str
    method: str
    settings: dict
    breakdown: dict          # category -> bytes (CATEGORIES)
    details: list            # (category, what, bytes): the lines that sum to each category
    trainable_params: int
    base_params: int

    @property
    def total_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def all_params(self) -> int:
        return self.base_params + (self.trainable_params if self.method != "full" else 0)

    def to_dict(self) -> dict:
        return {"model": self.model, "method": self.method, "settings": dict(self.settings),
                "total_bytes": self.total_bytes, "total_GB": self.total_bytes / GB,
                "trainable_params": self.trainable_params, "all_params": self.all_params,
                "breakdown": dict(self.breakdown),
                "details": [{"category": c, "what": w, "bytes": n} for c, w, n in self.details]}

    def __str__(self) -> str:
        return format_estimate(self)


def estimate(model, method: str = "qlora", r=None, targets=None, seq_len: int = 512, batch_size: int = 1,
             gradient_checkpointing=None, double_quant: bool = True, blocksize: int = 64,
             nested_blocksize: int = 256, weight_bytes: int = 2, grad_bytes: int = 2, adapter_bytes: int = 2,
             optimizer_state_bytes: int = 4, master_weights: bool = False, upcast_non_quantized: bool = False,
             include_activations: bool = True, activation_bytes_per_value: int = 2,
             dropout: bool = True, share_dynamic_map: bool = True, optim_bits: int = 32) -> MemoryEstimate:
    """Bytes of one training step, by category. r / targets / gradient_checkpointing default per method
    (METHOD_DEFAULTS: lora r=8 on q,v as PEFT; qlora r=64 all-linear with checkpointing as qlora.py).
    optim_bits=8 counts bitsandbytes' 8-bit AdamW states (adam_state_bytes) instead of optimizer_state_bytes."""
    shape = get_shape(model)
    adam_state_bytes((), optim_bits)                    # refuse a bad optim_bits before any work
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_DEFAULTS)}")
    d_r, d_t, d_gc = METHOD_DEFAULTS[method]
    r = d_r if r is None else r
    targets = d_t if targets is None else targets
    gc = d_gc if gradient_checkpointing is None else bool(gradient_checkpointing)
    counts = param_counts(shape)
    N = counts["total"]
    details = []
    def add(cat, what, n):
        return details.append((cat, what, int(n)))

    if method == "full":
        trainable = N
        add("weights", f"{N:,} params × {weight_bytes} B", N * weight_bytes)
        if master_weights:
            add("weights", f"fp32 master copy {N:,} × 4 B", N * 4)
        add("gradients", f"{N:,} × {grad_bytes} B", N * grad_bytes)
        if optim_bits == 8:
            lin = block_linears(shape)
            sizes = [d_in * d_out for _ in range(shape.n_layer) for d_in, d_out in lin.values()] + [counts["other"]]
            add("optimizer_states", f"Adam m, v 8-bit: {N:,} × (2 B codes + 8 B absmax / 256)",
                adam_state_bytes(sizes, 8))
        else:
            add("optimizer_states", f"Adam m, v: {N:,} × 2 × {optimizer_state_bytes} B",
                N * 2 * optimizer_state_bytes)
    else:
        trainable = lora_trainable_params(shape, r, targets)
        if method == "lora":
            add("weights", f"frozen base {N:,} × {weight_bytes} B", N * weight_bytes)
        else:
            lin = block_linears(shape)
            parts = {}
            for _ in range(shape.n_layer):
                for d_in, d_out in lin.values():
                    for k, v in nf4_tensor_bytes(d_in * d_out, blocksize, double_quant, nested_blocksize).items():
                        parts[k] = parts.get(k, 0) + v
            add("weights", f"NF4 codes: {counts['linear']:,} linear params × 0.5 B", parts.pop("codes"))
            n_tensors = shape.n_layer * len(lin)
            maps = (1 if share_dynamic_map else n_tensors) * 256 * 4 if double_quant else 0
            label = "DQ statistics (uint8 absmax, fp32 absmax2 and offset)" if double_quant else "fp32 absmax"
            tables = parts.pop("nf4_table")
            add("weights", label, sum(parts.values()))
            where = "one shared" if share_dynamic_map else "per tensor"
            add("weights", f"code tables (fp32 NF4 per tensor{f', dynamic map {where}' if double_quant else ''})",
                tables + maps)
            ob = 4 if upcast_non_quantized else weight_bytes
            add("weights", f"embeddings, norms, lm_head{', biases' if shape.bias else ''}: "
                           f"{counts['other']:,} × {ob} B", counts["other"] * ob)
        add("adapters", f"LoRA A, B: {trainable:,} × {adapter_bytes} B", trainable * adapter_bytes)
        add("gradients", f"adapters only: {trainable:,} × {grad_bytes} B", trainable * grad_bytes)
        if optim_bits == 8:
            lin = block_linears(shape)
            sizes = [n for _ in range(shape.n_layer) for t in resolve_targets(shape, targets)
                     for n in (r * lin[t][0], lin[t][1] * r)]                       # A (r, d_in), B (d_out, r)
            paged = " (paged AdamW 8-bit)" if method == "qlora" else " (AdamW 8-bit)"
            add("optimizer_states", f"AdamW m, v{paged}: {trainable:,} × (2 B codes + 8 B absmax / 256)",
                adam_state_bytes(sizes, 8))
        else:
            paged = " (paged AdamW 32-bit)" if method == "qlora" else ""
            add("optimizer_states", f"AdamW m, v{paged}: {trainable:,} × 2 × {optimizer_state_bytes} B",
                trainable * 2 * optimizer_state_bytes)
    if include_activations:
        vb = activation_bytes_per_value
        act = activation_bytes(shape, seq_len, batch_size, gc, vb, dropout)
        blocks = "1 block recomputed" if gc else f"{shape.n_layer} blocks"
        formula = (f"s·b·d·({16 * vb + 2 * dropout} + {2 * vb + dropout}·a·s/d)")
        add("activations", f"{blocks} × {formula}", act["blocks"])
        if gc:
            add("activations", f"checkpoints: {shape.n_layer} × {vb}·s·b·d", act["checkpoints"])
        add("activations", f"outside blocks {2 * vb + dropout}·s·b·d (final norm, lm_head inputs"
                           + (", dropout mask)" if dropout else ")"), act["head"])
        add("activations", "fp32 logits 4·s·b·V", act["logits"])
    breakdown = {c: sum(n for cat, _, n in details if cat == c) for c in CATEGORIES}
    settings = {"r": r if method != "full" else None, "targets": targets if method != "full" else None,
                "seq_len": seq_len, "batch_size": batch_size, "gradient_checkpointing": gc,
                "double_quant": double_quant if method == "qlora" else None, "master_weights": master_weights,
                "upcast_non_quantized": upcast_non_quantized, "include_activations": include_activations,
                "optim_bits": optim_bits}
    return MemoryEstimate(shape.name, method, settings, breakdown, details, trainable, N)


def tiny_gpt_shape(config) -> ModelShape:
    """minilora.nn.GPTConfig -> ModelShape: fused c_attn, 4d GELU MLP, LayerNorm, learned positions, untied head."""
    return ModelShape("tiny-gpt", config.n_layer, config.n_embd, config.n_head, 4 * config.n_embd, config.vocab_size,
                      mlp="gelu", norm="layernorm", tied_embeddings=False, n_positions=config.block_size,
                      bias=bool(getattr(config, "bias", True)), fused_qkv=True)


def estimate_tiny_gpt(config, method: str = "lora", r: int = 8, targets="c_attn", **kw) -> MemoryEstimate:
    """Predict the bytes of minilora's own tiny GPT. Every array has the config's dtype (float32: 4 B, float64: 8 B):
    weights, gradients, adapters and AdamW's m, v (zeros_like the parameter); QLoRA's non-quantized layers too.
    Activations are left out unless include_activations=True, which counts them at the config's dtype without
    dropout masks (64·s·b·d + 8·a·s²·b per block in float32). Compare with the bytes of the real arrays, e.g.
    minilora.peft.memory_report(model)."""
    nb = {"float32": 4, "float64": 8}[str(getattr(config, "dtype", "float32"))]
    kw = {"weight_bytes": nb, "grad_bytes": nb, "adapter_bytes": nb, "optimizer_state_bytes": nb,
          "upcast_non_quantized": False, "include_activations": False, "activation_bytes_per_value": nb,
          "dropout": False, **kw}
    return estimate(tiny_gpt_shape(config), method, r=r, targets=targets, **kw)


# ---------------------------------------------------------------------------------------------------------- output
def format_estimate(est: MemoryEstimate) -> str:
    s = est.settings
    head = f"{est.model}  method={est.method}"
    if est.method != "full":
        head += f"  r={s['r']}  targets={s['targets']}"
    head += (f"  seq_len={s['seq_len']}  batch_size={s['batch_size']}"
             f"  gradient_checkpointing={'on' if s['gradient_checkpointing'] else 'off'}")
    lines = [head, f"trainable params: {est.trainable_params:,d} || all params: {est.all_params:,d} || "
                   f"trainable%: {100 * est.trainable_params / est.all_params:.4f}", ""]
    for cat in CATEGORIES:
        n = est.breakdown[cat]
        lines.append(f"  {cat:<18} {fmt_bytes(n):>14}  {100 * n / max(est.total_bytes, 1):5.1f}%")
        lines += [f"      {what:<62} {fmt_bytes(b):>14}" for c, what, b in est.details if c == cat and b]
    lines.append(f"  {'total':<18} {fmt_bytes(est.total_bytes):>14}   ({est.total_bytes / 2**30:,.2f} GiB)")
    return "\n".join(lines)
