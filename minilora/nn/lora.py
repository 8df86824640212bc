"""LoRA: a frozen linear layer plus a trainable low-rank update, y = x W0ᵀ + b + s · dropout(x) Aᵀ Bᵀ.

A (r, D_in) starts U(±1/√D_in) (PEFT's kaiming_uniform(a=√5)), B (D_out, r) starts at zero, so ΔW = s·B A = 0 and
the wrapped model is unchanged at step 0. s = lora_alpha / r, or lora_alpha / √r with rsLoRA (arXiv 2312.03732).
ΔW is never formed in forward or backward (the LoRA branch is two thin matmuls, see `functional.lora_forward`);
it is only built by `get_delta_weight` for merging. The backward, with h = dropout(x) Aᵀ (N, r):

    dB = s · dyᵀ h          dA = s · (dy B)ᵀ dropout(x)          dx = dy W0 + s · dropout_backward((dy B) A)

and nothing for W0: the base layer is frozen, so its dW matmul is skipped and no gradient or optimizer state is
ever allocated for it. Wrapping a `Linear4bit` instead of a `Linear` gives QLoRA: W0 lives in NF4 and dx flows
through the dequantized W0 (arXiv 2305.14314).

DoRA (arXiv 2402.09353, `use_dora=True`) splits the adapted weight into a magnitude and a direction:

    W' = m ⊙ (W0 + s·B A) / n,      n = ‖W0 + s·B A‖ per output row (D_out,),   m (D_out,) trainable, m₀ = n₀

so y = x W'ᵀ + b = b + (m/n) ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ): the LoRA output plus a per-output rescaling of the whole
(base + LoRA) product. The norm n is recomputed from the current A, B every forward but treated as a constant in
the backward (detached, as PEFT does): the paper's §4.3 "gradient simplification" argues that letting gradient flow
through ‖W0 + s·B A‖ only adds a projection term to ∂L/∂(W0 + s·B A), and that dropping it costs no accuracy while the
backward then needs no (D_out, D_in) gradient at all, only the thin LoRA matmuls (it reports the memory saved). With
n constant, dm = Σ_rows dy ⊙ x (W0 + s·B A)ᵀ / n and the LoRA branch sees dy ⊙ m/n (`functional.dora_forward` /
`dora_backward`). PEFT's names: `lora_magnitude_vector.<adapter>.weight` (m), a ModuleDict of `DoraLinearLayer`.

init_lora_weights="pissa" (arXiv 2404.02948) / "olora" (arXiv 2406.01775) start A, B on W0's top-r singular
directions / first r QR directions and replace W0 by the residual W0 − s·B A, so the model is unchanged at step 0
(`pissa_factors`, `olora_factors`, PEFT's `pissa_init` / `olora_init`). PiSSA needs a float base (TypeError on a
4-bit one, as PEFT); OLoRA on a 4-bit base dequantizes, factors and re-quantizes the residual, as PEFT.

init_lora_weights="loftq" (arXiv 2310.08659, `loftq_factors`) is QLoRA's quantization-aware start: it alternates
Q = NF4(W0 − s·B A) and s·B A = the rank-r SVD of W0 − Q, so the 4-bit base Q plus the adapter approximates the float
W0 before any training (plain QLoRA starts from Q0 = NF4(W0) and B = 0). The float base becomes a Linear4bit holding
Q; `loftq_config` ({"loftq_bits": 4, "loftq_iter": T}, PEFT's LoftQConfig) sets T.

As in PEFT, `lora_A` and `lora_B` are ModuleDicts of bias-free Linear layers, one per adapter name:

    layer.lora_A["default"].weight      A (r, D_in)        PEFT: nn.Linear(in_features, r, bias=False)
    layer.lora_B["default"].weight      B (D_out, r)       PEFT: nn.Linear(r, out_features, bias=False)

so code written here runs on a PEFT model unchanged. The Linears only hold the weights: forward and backward call
`functional.lora_forward` / `lora_backward` on their `.weight.data` (never the Linears' own passes), and dA, dB
accumulate into `.weight.grad`.

Mirrors Hugging Face PEFT `src/peft/tuners/lora/layer.py` (`LoraLayer`, `Linear`: per-adapter dicts `r`,
`lora_alpha`, `scaling`, `lora_dropout`, ModuleDicts `lora_A`, `lora_B`; `update_layer`, `set_adapter`,
`delete_adapter`, `get_delta_weight`, `merge(safe_merge, adapter_names)`, `unmerge` LIFO) and `bnb.py`
(`Linear4bit.merge` dequantizes, adds ΔW and re-quantizes). In-memory parameter names are PEFT's:
`base_layer.weight`, `lora_A.<adapter>.weight`, `lora_B.<adapter>.weight`.
"""
from __future__ import annotations

import math
import warnings

from minilora.backend import default_rng, get_array_module
from minilora.nn import functional as F
from minilora.nn.layers import Linear
from minilora.nn.linear4bit import Linear4bit
from minilora.nn.module import Module, ModuleDict
from minilora.nn.parameter import Parameter
from minilora.quant import dequantize_4bit, quantize_4bit


def check_adapter_name(name) -> str:
    """An adapter name is a ModuleDict key (torch refuses '' and '.') and, once saved, a folder name (PEFT saves every
    adapter but "default" in a sub-folder named after it), so it must be one plain folder name: no '.', no path
    separator, no drive colon, no control character. Anything else could write or read outside the save folder."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty str, got {name!r}")
    bad = sorted({c for c in name if c in "./\\:" or ord(c) < 32})
    if bad:
        raise ValueError(f"adapter_name {name!r} must be one plain folder name without {bad} (no '.', '/', '\\', "
                         "':' or control characters): adapters other than 'default' are saved in a sub-folder "
                         "named after them")
    if hasattr(ModuleDict, name) or name in vars(ModuleDict()):
        raise ValueError(f"adapter_name {name!r} is the name of a ModuleDict attribute or method (as torch, a "
                         "ModuleDict refuses such keys); choose another name")
    return name


INIT_LORA_WEIGHTS = (True, False, "gaussian", "pissa", "olora", "loftq")


def check_lora_args(r, lora_alpha, lora_dropout=0.0, init_lora_weights=True, max_r=None) -> None:
    """One adapter's hyperparameters, checked where a user passes them (LoraConfig, LoRALinear): ValueError unless
    r is an integer >= 1 (and <= max_r = min(in_features, out_features) when the layer is known), lora_alpha a
    finite number > 0, lora_dropout a probability in [0, 1) and init_lora_weights one of INIT_LORA_WEIGHTS."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if not (number(r) and isinstance(r, int) and 1 <= r <= (max_r or r)):
        where = f" in [1, min(in_features, out_features)] = [1, {max_r}] for this layer" if max_r else ""
        raise ValueError(f"`r` should be a positive integer value{where}, but the value passed is {r!r}")
    if not (number(lora_alpha) and 0 < lora_alpha < math.inf):
        raise ValueError(f"`lora_alpha` should be a finite positive number but the value passed is {lora_alpha!r} "
                         "(the scaling lora_alpha/r would zero or flip the adapter)")
    if not (number(lora_dropout) and 0.0 <= lora_dropout < 1.0):
        raise ValueError(f"`lora_dropout` should be a probability in [0, 1) but the value passed is {lora_dropout!r}")
    if isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa_niter_"):
        raise ValueError(f"init_lora_weights={init_lora_weights!r}: PEFT's fast PiSSA draws its random projection "
                         "from torch's generator (torch.svd_lowrank), so it cannot be reproduced here; use 'pissa' "
                         "(the exact SVD)")
    if not (init_lora_weights is True or init_lora_weights is False or init_lora_weights in INIT_LORA_WEIGHTS[2:]):
        raise ValueError(f"init_lora_weights={init_lora_weights!r} is not implemented in minilora; choose one of "
                         f"{INIT_LORA_WEIGHTS} (EVA/CorDA also read more than the base weight)")


def pissa_factors(W0, r, scaling):
    """PiSSA (arXiv 2404.02948): the top-r singular triplets of W0 become the adapter, the rest stays frozen.

        W0 = U S Vᵀ,   A = √(S_r / s) V_rᵀ (r, D_in),   B = U_r √(S_r / s) (D_out, r),   W_res = W0 − s·B A

    so W_res + s·B A = W0 at step 0 and the trainable part is W0's principal subspace. S_r is divided by s so that
    s·B A = U_r S_r V_rᵀ whatever lora_alpha is (PEFT's `pissa_init`: Sr /= scaling, then √Sr on each side).
    W0 (D_out, D_in) float -> (A, B, W_res), computed in float32 (float64 for a float64 W0) as PEFT."""
    xp = get_array_module(W0)
    W = W0.astype(xp.float64 if W0.dtype == xp.float64 else xp.float32)   # (D_out, D_in)
    U, S, Vh = xp.linalg.svd(W, full_matrices=False)                   # (D_out, k), (k,), (k, D_in)
    root = xp.sqrt(S[:r] / scaling)                                     # (r,)  √(S_r / s)
    A = root[:, None] * Vh[:r]                                          # (r, D_in)
    B = U[:, :r] * root[None, :]                                        # (D_out, r)
    return A, B, W - scaling * (B @ A)                                  # W_res (D_out, D_in)


def olora_factors(W0, r, scaling):
    """OLoRA (arXiv 2406.01775): the adapter starts on W0's first r orthonormal directions from a QR decomposition.

        W0 = Q R,   B = Q[:, :r] (D_out, r),   A = R[:r] (r, D_in),   W_res = W0 − s·B A

    (PEFT's `olora_init`, no division by s: the residual absorbs it.) W0 (D_out, D_in) -> (A, B, W_res), in float32
    (float64 for a float64 W0)."""
    xp = get_array_module(W0)
    W = W0.astype(xp.float64 if W0.dtype == xp.float64 else xp.float32)   # (D_out, D_in)
    Q, R = xp.linalg.qr(W)                                              # (D_out, k), (k, D_in)
    A, B = R[:r].copy(), Q[:, :r].copy()                                # (r, D_in), (D_out, r)
    return A, B, W - scaling * (B @ A)                                  # W_res (D_out, D_in)


def check_loftq_config(loftq_config) -> dict:
    """PEFT's LoftQConfig as the dict LoraConfig stores ({"loftq_bits": 4, "loftq_iter": T}), checked with PEFT's
    messages: ValueError when it is missing or empty, for bits other than 4 and 8 and for T < 1; 8 bits (PEFT's
    int8 variant) is refused because minilora has no 8-bit base layer to hold Q. Returns a plain dict."""
    if not loftq_config:
        raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
    if not isinstance(loftq_config, dict) and not hasattr(loftq_config, "loftq_iter"):
        raise ValueError(f"loftq_config must be a LoftQConfig or a dict, got {loftq_config!r}")
    cfg = dict(loftq_config) if isinstance(loftq_config, dict) else dict(vars(loftq_config))
    unknown = sorted(set(cfg) - {"loftq_bits", "loftq_iter"})
    if unknown:
        raise ValueError(f"loftq_config has unknown key(s) {unknown}; PEFT's LoftQConfig has loftq_bits, loftq_iter")
    bits, num_iter = cfg.get("loftq_bits", 4), cfg.get("loftq_iter", 1)
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"Only nf4 and int8 quantization is supported (loftq_bits={bits!r})")
    if bits == 8:
        raise ValueError("loftq_bits=8 (PEFT's int8 LoftQ) is not implemented in minilora: Q is stored by a "
                         "4-bit Linear4bit base; use loftq_bits=4")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter <= 0:
        raise ValueError(f"Number of iterations must be greater than 0 (loftq_iter={num_iter!r})")
    return {"loftq_bits": bits, "loftq_iter": num_iter}


def loftq_factors(W0, r, scaling, num_iter=1, quant_type="nf4", blocksize=64, compress_statistics=False,
                  nested_rounding="exact"):
    """LoftQ (arXiv 2310.08659, Algorithm 1): a 4-bit Q and an adapter s·B A with Q + s·B A ≈ W0 before training.

    Plain QLoRA starts from Q0 = NF4(W0) with B = 0, an error ‖W0 − Q0‖_F. LoftQ alternates T times

        Q_t      = NF4(W0 − s·B_{t-1} A_{t-1})           (B_0 A_0 = 0, so Q_1 = Q0)
        U S Vᵀ   = svd(W0 − Q_t),     s·B_t A_t = U_r S_r V_rᵀ     (the best rank-r fit of what Q_t missed)

    so the first step already beats plain QLoRA (‖W0 − Q_1 − s·B_1 A_1‖ < ‖W0 − Q0‖ whenever the residual is not 0,
    Eckart–Young) and later steps let the quantizer see the part the adapter will carry. As PEFT's `loftq_init`,
    √S_r goes to each side: B = U_r √S_r, A = √S_r V_rᵀ, and here both are divided by √s so that s·B A = U_r S_r V_rᵀ
    for any lora_alpha. PEFT does not divide (its A, B are these times √s; the same when lora_alpha = r), so there
    the model starts at Q + s·P with P the rank-r fit, and since ⟨W0 − Q, P⟩ = ‖P‖² its error is
    ‖W0 − Q‖² − (2s − s²)‖P‖²: at lora_alpha = 2r no better than plain QLoRA, beyond that worse (huggingface/peft#1982).

    W0 (D_out, D_in) float -> (A (r, D_in), B (D_out, r), W_res (D_out, D_in)) in float32, as PEFT. W_res = W0 −
    s·B_{T-1} A_{T-1} is the last matrix quantized: the 4-bit base stores quantize_4bit(W_res) with these settings
    (deterministic, so the same codes Q_T came from). quant_type/blocksize/compress_statistics/nested_rounding are
    `quantize_4bit`'s; PEFT's loftq_init uses NF4, blocks of 64, no double quantization (the defaults here).

    PEFT's `loftq_init` moves the weight to CUDA (or XPU) unconditionally, so it cannot run on this CPU-only project
    as shipped; tests/peft/test_loftq_peft.py runs its source with that one line set to the CPU (bitsandbytes' CPU
    NF4) and gets the same Q (bit for bit at T = 1, to float32 rounding after) and, at s = 1, the same A and B."""
    if W0.ndim != 2:
        raise ValueError(f"LoftQ factors a 2-D weight (D_out, D_in), got shape {tuple(W0.shape)}")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(W0.shape):
        raise ValueError(f"r must be an integer in [1, min(D_out, D_in)] = [1, {min(W0.shape)}], got {r!r}")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter <= 0:
        raise ValueError(f"Number of iterations must be greater than 0 (num_iter={num_iter!r})")
    if not scaling > 0:
        raise ValueError(f"scaling must be > 0, got {scaling!r}")
    xp = get_array_module(W0)
    W = W0.astype(xp.float32)                                           # (D_out, D_in)  PEFT computes in float32
    W_res = W                                                           # (D_out, D_in)  what gets quantized
    for t in range(num_iter):
        packed, state = quantize_4bit(W_res, blocksize=blocksize, quant_type=quant_type,
                                      compress_statistics=compress_statistics, nested_rounding=nested_rounding)
        Q = dequantize_4bit(packed, state)                              # (D_out, D_in)  Q_t
        U, S, Vh = xp.linalg.svd(W - Q, full_matrices=False)            # (D_out, k), (k,), (k, D_in)
        root = xp.sqrt(S[:r] / scaling)                                 # (r,)  √(S_r / s)
        A = root[:, None] * Vh[:r]                                      # (r, D_in)
        B = U[:, :r] * root[None, :]                                    # (D_out, r)   s·B A = U_r S_r V_rᵀ
        if t + 1 < num_iter:                                            # PEFT: no new residual after the last fit
            W_res = W - scaling * (B @ A)                               # (D_out, D_in)
    return A, B, W_res


class DoraLinearLayer(Module):
    """DoRA's magnitude m for one adapter: only the Parameter `weight` (D_out,), as PEFT's `DoraLinearLayer`
    (src/peft/tuners/lora/dora.py). The passes are `functional.dora_forward` / `dora_backward`, run by LoRALinear."""

    def __init__(self, magnitude):
        super().__init__()
        self.weight = Parameter(magnitude)                 # (D_out,)  m, starts at ‖W0 + s·B A‖ per row


class LoRALinear(Module):
    """A Linear or Linear4bit base layer (frozen) plus one or more named LoRA (or DoRA) adapters."""

    def __init__(self, base_layer, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights=True, use_rslora: bool = False, rng=None,
                 use_dora: bool = False, loftq_config=None):
        super().__init__()
        if not isinstance(base_layer, (Linear, Linear4bit)):
            raise TypeError(f"LoRALinear wraps a Linear or Linear4bit, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad = False                        # W0 (and b) frozen: no grad, no optimizer state
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = ModuleDict()                         # adapter -> Linear(D_in, r, bias=False), weight (r, D_in)
        self.lora_B = ModuleDict()                         # adapter -> Linear(r, D_out, bias=False), weight (D_out, r)
        self.lora_magnitude_vector = ModuleDict()          # DoRA adapters -> DoraLinearLayer, weight m (D_out,)
        self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.use_rslora = {}, {}, {}, {}, {}
        self.use_dora = {}                                 # adapter -> bool
        self.active_adapters = [adapter_name]
        self.merged_adapters = []
        self._merged_factors = {}                          # adapter -> (A, B, scaling, DoRA's m/n or None) as merged
        self._unmerged_4bit = None                         # a 4-bit base's codes and state from before the first merge
        self.disable_adapters = False                      # PEFT's flag: True runs the base layer alone
        self._rng = default_rng(0) if rng is None else rng   # seeded: init and dropout masks are reproducible
        self._cache = None
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora,
                          loftq_config)

    # ---- adapters -------------------------------------------------------------------------------------------
    @property
    def active_adapter(self):
        """The active adapter's name (a list when several are active, as PEFT)."""
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight_dtype(self):
        b = self.base_layer
        return b.compute_dtype if isinstance(b, Linear4bit) else b.weight.data.dtype

    def get_base_layer(self):
        return self.base_layer

    @property
    def rng(self):
        """The generator this layer draws A's initialisation and its dropout masks from. Gradient checkpointing
        (GPT.gradient_checkpointing_enable) swaps in a copy while it recomputes a block, so the masks repeat."""
        return self._rng

    @rng.setter
    def rng(self, generator):
        self._rng = generator

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False, loftq_config=None):
        """Add adapter `adapter_name` with A (r, D_in), B (D_out, r) (and DoRA's m (D_out,) = ‖W0 + s·B A‖ per row
        with use_dora); trainable only if it is active. loftq_config ({"loftq_bits": 4, "loftq_iter": T} or a
        LoftQConfig) is read only with init_lora_weights="loftq", which turns a float base into a Linear4bit."""
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {use_dora!r}")
        check_adapter_name(adapter_name)
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer; delete_adapter it first")
        check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights, max_r=min(self.in_features, self.out_features))
        d_in, d_out, dt, rng = self.in_features, self.out_features, self.weight_dtype, self._rng
        scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        if init_lora_weights == "pissa" and isinstance(self.base_layer, Linear4bit):
            raise TypeError("Please initialize PiSSA under float32, float16, or bfloat16. Subsequently, re-quantize "
                            "the residual model to help minimize quantization errors. (PEFT's message: PiSSA needs "
                            "the float base weight; run it before quantize_model.)")
        if init_lora_weights == "loftq":
            A, B = self._loftq_init(r, scaling, loftq_config)                  # (r, D_in), (D_out, r)
        elif init_lora_weights in ("pissa", "olora"):   # the base weight becomes the residual W0 − s·B A (PEFT)
            factors = pissa_factors if init_lora_weights == "pissa" else olora_factors
            A, B, W_res = factors(self._base_weight(), r, scaling)                 # (r, D_in), (D_out, r), W0 shape
            self._set_base_weight(W_res.astype(dt))                             # a 4-bit base (OLoRA) re-quantizes
        else:
            if init_lora_weights == "gaussian":
                A = rng.standard_normal((r, d_in)) * (1.0 / r)                  # (r, D_in)  N(0, σ = 1/r)
            else:
                bound = 1.0 / math.sqrt(d_in)                                   # kaiming_uniform(a=√5), fan_in = D_in
                A = rng.uniform(-bound, bound, (r, d_in))                       # (r, D_in)
            if init_lora_weights is False:
                B = rng.uniform(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r), (d_out, r))   # (D_out, r) not a no-op
            else:
                B = get_array_module(A).zeros((d_out, r))                       # (D_out, r)  ΔW = 0 at the start
        self.lora_A[adapter_name] = Linear.from_weight(A.astype(dt))           # PEFT: nn.Linear(D_in, r, bias=False)
        self.lora_B[adapter_name] = Linear.from_weight(B.astype(dt))           # PEFT: nn.Linear(r, D_out, bias=False)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.scaling[adapter_name] = scaling
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.use_dora[adapter_name] = use_dora
        if use_dora:                                        # m₀ = n₀, so W' = W0 + s·B A at the start (PEFT)
            A, B = self.lora_A[adapter_name].weight.data, self.lora_B[adapter_name].weight.data
            m = F.dora_weight_norm(self._base_weight(), A, B, self.scaling[adapter_name])   # (D_out,)
            self.lora_magnitude_vector[adapter_name] = DoraLinearLayer(m.astype(dt))
        self.set_adapter(self.active_adapters)             # keeps the active set; fixes requires_grad flags

    def _loftq_init(self, r, scaling, loftq_config):
        """LoftQ on a float base: A, B from `loftq_factors`, and the base replaced by a Linear4bit storing
        NF4(W_res) = Q (bias kept in float). Quantization settings: QLoRALinear's arguments, else PEFT's (NF4, blocks
        of 64, no double quantization). A 4-bit base is refused: LoftQ needs W0 itself, which a 4-bit base no longer
        has (PEFT's doc: "you should not pass a quantized model in this case")."""
        cfg = check_loftq_config(loftq_config)
        base = self.base_layer
        if not isinstance(base, Linear):
            raise TypeError("init_lora_weights='loftq' quantizes the float base itself: pass the float model (a "
                            "Linear), not a 4-bit one; LoftQ needs W0, which Linear4bit no longer holds")
        settings = getattr(self, "_loftq_quant", None) or dict(quant_type="nf4", blocksize=64,
                                                               compress_statistics=False)
        A, B, W_res = loftq_factors(base.weight.data, r, scaling, cfg["loftq_iter"], **settings)
        bias = None if base.bias is None else base.bias.data
        self.base_layer = Linear4bit.from_linear(Linear.from_weight(W_res.astype(base.weight.data.dtype), bias),
                                                 **settings)             # stores Q = NF4(W_res)
        return A, B

    def set_adapter(self, adapter_names):
        """Activate one adapter (a str) or several (a list, outputs summed); only active adapters train."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {list(self.lora_A)}")
        if self.merged:
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
            self.unmerge()
        for key in self.lora_A:
            trainable = key in names
            self.lora_A[key].weight.requires_grad = trainable
            self.lora_B[key].weight.requires_grad = trainable
            if key in self.lora_magnitude_vector:
                self.lora_magnitude_vector[key].weight.requires_grad = trainable
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str):
        if adapter_name not in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} does not exist; this layer has {list(self.lora_A)}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weight; unmerge() before deleting it")
        for d in (self.lora_A, self.lora_B, self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.use_rslora,
                  self.use_dora):
            del d[adapter_name]
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = [n for n in self.active_adapters if n != adapter_name]
            if not remaining and len(self.lora_A):
                remaining = [next(iter(self.lora_A))]
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                              f"{remaining[0]}.", stacklevel=2)
            self.set_adapter(remaining)

    def enable_adapters(self, enabled: bool):
        self.disable_adapters = not enabled

    # ---- merging --------------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str):
        """ΔW = scaling · B @ A, shape (D_out, D_in), in the base weight's dtype."""
        A, B = self.lora_A[adapter_name].weight.data, self.lora_B[adapter_name].weight.data   # (r, D_in), (D_out, r)
        return _delta(A, B, self.scaling[adapter_name])

    def _base_weight(self):
        b = self.base_layer
        return b.dequantize_weight() if isinstance(b, Linear4bit) else b.weight.data   # (D_out, D_in)

    def _set_base_weight(self, W):
        b = self.base_layer
        if isinstance(b, Linear4bit):
            b.set_weight(W)                                                     # re-quantize into fresh NF4/FP4
        else:
            b.weight.data[...] = W

    def merge(self, safe_merge: bool = False, adapter_names=None):
        """W0 += ΔW for each adapter (default: the active ones), remembered in merged_adapters.

        safe_merge=True merges into a copy first and raises ValueError if it holds NaN/Inf (W0 left untouched).
        On a 4-bit base the sum is re-quantized, which adds rounding error (PEFT warns the same way). Unlike PEFT,
        the pre-merge 4-bit codes are kept while merged (one more 4-bit copy of the layer), so unmerge gives them
        back byte for byte, and A, B are remembered as merged (r·(D_in + D_out) values), so unmerge takes out the
        ΔW that went in even if the adapter was changed meanwhile.

        A DoRA adapter merges as PEFT's: W ← c ⊙ (W + ΔW) with c = m / ‖W0 + ΔW‖ per row, the norm taken on the
        weight with the adapters merged before it taken out (as its forward sees it); c is remembered for unmerge,
        W ← W / c − ΔW."""
        names = self.active_adapters if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(f"Already following adapters were merged {','.join(already)}. You are now additionally "
                          f"merging {','.join(n for n in names if n not in already)}.", stacklevel=2)
        for name in names:
            if name in already:
                continue
            if name not in self.lora_A:
                raise ValueError(f"cannot merge unknown adapter {name!r}; this layer has {list(self.lora_A)}")
            if isinstance(self.base_layer, Linear4bit):
                warnings.warn("Merge lora module to 4-bit linear may get different generations due to rounding "
                              "errors.", stacklevel=2)
            if isinstance(self.base_layer, Linear4bit) and not self.merged_adapters:
                b = self.base_layer                             # set_weight replaces these two, never edits them
                self._unmerged_4bit = (b.weight.data, b.weight.quant_state)
            W = self._base_weight()
            delta = self.get_delta_weight(name)                                 # (D_out, D_in)
            c = None
            if self.use_dora[name]:
                A, B = self.lora_A[name].weight.data, self.lora_B[name].weight.data   # (r, D_in), (D_out, r)
                n = F.dora_weight_norm(self._unmerged_base_weight(), A, B, self.scaling[name])   # (D_out,)
                c = self.lora_magnitude_vector[name].weight.data / n           # (D_out,)  m / n
            if safe_merge or isinstance(self.base_layer, Linear4bit):
                merged = W + delta                                              # (D_out, D_in) a copy
                if c is not None:
                    merged *= c[:, None]                                        # (D_out, D_in)  c ⊙ (W + ΔW)
                if safe_merge:
                    xp = get_array_module(merged)
                    bad = ~xp.isfinite(merged)
                    if bool(bad.any()):
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be "
                                         f"broken ({int(bad.sum())} non-finite values)")
                self._set_base_weight(merged)
            else:
                W += delta                                                      # in place
                if c is not None:
                    W *= c[:, None]                                             # (D_out, D_in)  c ⊙ (W + ΔW)
            self.merged_adapters.append(name)
            self._merged_factors[name] = (self.lora_A[name].weight.data.copy(),   # (r, D_in)
                                          self.lora_B[name].weight.data.copy(),   # (D_out, r)
                                          self.scaling[name], c)                  # c (D_out,) or None

    def _unmerged_base_weight(self):
        """W0 with every merged adapter taken out (D_out, D_in): the weight DoRA's norm is taken on (PEFT's
        `_unmerged_base_weight`). A copy, except when nothing is merged."""
        if not self.merged_adapters:
            return self._base_weight()
        if self._unmerged_4bit is not None:                                     # the codes from before any merge
            codes, state = self._unmerged_4bit
            return dequantize_4bit(codes, state).astype(self.base_layer.compute_dtype)   # (D_out, D_in)
        W = self.base_layer.weight.data.copy()                                  # (D_out, D_in)
        for name in reversed(self.merged_adapters):
            A, B, s, c = self._merged_factors[name]
            if c is not None:
                W /= c[:, None]
            W -= _delta(A, B, s)
        return W

    def unmerge(self):
        """Undo merge(): pop merged adapters last-in first-out and subtract the ΔW each one added.

        A 4-bit base gets its pre-merge codes and state back exactly (PEFT re-quantizes Ŵ − ΔW instead, so each
        merge/unmerge cycle there adds NF4 rounding error, and its warning is all that says so)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            A, B, s, c = self._merged_factors.pop(self.merged_adapters.pop())
            if not isinstance(self.base_layer, Linear4bit):
                if c is not None:
                    self.base_layer.weight.data /= c[:, None]                  # (D_out, D_in)  DoRA: W / c − ΔW
                self.base_layer.weight.data -= _delta(A, B, s)                  # (D_out, D_in)
        if self._unmerged_4bit is not None:
            b = self.base_layer
            b.weight.data, b.weight.quant_state = self._unmerged_4bit
            self._unmerged_4bit = None

    # ---- the two passes -------------------------------------------------------------------------------------
    def forward(self, x):
        """y = base(x) + Σ_active s · dropout(x) Aᵀ Bᵀ   (base alone when merged or disabled).   x (..., D_in).

        A DoRA adapter adds `functional.dora_forward`'s term instead: (m/n − 1) ⊙ base_out + (m/n) ⊙ s·xd Aᵀ Bᵀ,
        with base_out = base(x) − b without dropout (PEFT reuses the base result) and xd W0ᵀ with it."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        y = self.base_layer(x)                                                 # (..., D_out)
        self._cache = None
        if self.disable_adapters or self.merged:
            return y
        x2 = x.reshape(-1, self.in_features)                                   # (N, D_in)
        y2 = y.reshape(-1, self.out_features)                                  # (N, D_out) view of y
        active = [n for n in self.active_adapters if n in self.lora_A]
        if len(active) > 1 and any(self.use_dora[n] for n in active):
            raise NotImplementedError(f"several active adapters {active} with DoRA among them: PEFT rescales the "
                                      "outputs of the adapters before a DoRA one as well; activate one at a time")
        caches = []
        for name in active:
            p = self.lora_dropout[name] if self.training else 0.0
            xd, mask = F.dropout_forward(x2, p, self._rng)                     # (N, D_in)
            A, B = self.lora_A[name].weight.data, self.lora_B[name].weight.data   # (r, D_in), (D_out, r)
            s = self.scaling[name]
            if self.use_dora[name]:
                W0 = self._base_weight()                                       # (D_out, D_in)
                if mask is None:                                               # PEFT: the base result, bias removed
                    b = self.base_layer.bias
                    base_out = y2 - b.data if b is not None else y2.copy()     # (N, D_out)  x W0ᵀ
                else:                                                          # PEFT: W0 applied to dropout(x)
                    base_out = xd @ W0.T                                       # (N, D_out)  xd W0ᵀ
                n = F.dora_weight_norm(W0, A, B, s)                            # (D_out,)  held constant
                m = self.lora_magnitude_vector[name].weight.data               # (D_out,)
                out, cache = F.dora_forward(xd, base_out, A, B, s, m, n)       # (N, D_out)
            else:
                out, cache = F.lora_forward(xd, A, B, s)                       # (N, D_out)
            y2 += out                                                          # (N, D_out)
            caches.append((name, mask, cache))
        self._cache = caches
        return y

    def backward(self, dout):
        """dx through the frozen base (dy W0, dequantized for 4-bit) plus each adapter's branch; dA, dB (and DoRA's
        dm) accumulate."""
        dx = self.base_layer.backward(dout)                                    # (..., D_in)  no dW for W0
        caches, self._cache = self._cache, None                                # freed once used
        if not caches:
            return dx
        dy2 = dout.reshape(-1, self.out_features)                              # (N, D_out)
        dx2 = dx.reshape(-1, self.in_features)                                 # (N, D_in) view of dx
        for name, mask, cache in caches:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight           # (r, D_in), (D_out, r)
            if self.use_dora[name]:
                M = self.lora_magnitude_vector[name].weight                     # (D_out,)
                ddx, dA, dB, dm = F.dora_backward(dy2, cache, A.data, B.data, self.scaling[name],
                                                  self._base_weight(), need_dA=A.requires_grad,
                                                  need_dB=B.requires_grad, need_dm=M.requires_grad)
                if dm is not None:
                    M.accumulate_grad(dm, owned=True)
            else:
                ddx, dA, dB = F.lora_backward(dy2, cache, A.data, B.data, self.scaling[name],
                                              need_dA=A.requires_grad, need_dB=B.requires_grad)
            dx2 += F.dropout_backward(ddx, mask)                               # (N, D_in)
            if dA is not None:
                A.accumulate_grad(dA, owned=True)
            if dB is not None:
                B.accumulate_grad(dB, owned=True)
        return dx

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={ {n: self.r[n] for n in self.r} }, active={self.active_adapters}, merged={self.merged}")


def _delta(A, B, scaling):
    """ΔW = scaling · B @ A: A (r, D_in), B (D_out, r) -> (D_out, D_in)."""
    delta = B @ A                                                               # (D_out, D_in)
    delta *= scaling
    return delta


class QLoRALinear(LoRALinear):
    """LoRA on a 4-bit base: a Linear is first converted with Linear4bit.from_linear (NF4 + double quant default).

    With init_lora_weights="loftq" a Linear is handed to LoftQ instead, which quantizes its residual W0 − s·B A with
    these same settings (quant_type, compress_statistics, blocksize)."""

    def __init__(self, base_layer, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights=True, use_rslora: bool = False, rng=None,
                 quant_type: str = "nf4", compress_statistics: bool = True, blocksize: int = 64,
                 use_dora: bool = False, loftq_config=None):
        self._loftq_quant = dict(quant_type=quant_type, compress_statistics=compress_statistics, blocksize=blocksize)
        if not isinstance(base_layer, Linear4bit) and not (init_lora_weights == "loftq"
                                                           and isinstance(base_layer, Linear)):
            base_layer = Linear4bit.from_linear(base_layer, quant_type=quant_type,
                                                compress_statistics=compress_statistics, blocksize=blocksize)
        super().__init__(base_layer, adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, rng,
                         use_dora=use_dora, loftq_config=loftq_config)
