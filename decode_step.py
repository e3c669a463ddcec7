"""The one-token decode step fused: each decoder block one call into C, its products packed or dense.

A decode step of SmolLM2-135M in eager PyTorch spends as long between its products as in them (docs/
packed_decode.md: ~18 ms of a 36 ms step on an Intel Xeon): every block is some sixty small torch ops (norms, RoPE,
the cache, attention, the activation, residuals) of a few microseconds each, and seven products, each its own call
from Python and its own wake-up of the threads. decode_step.c runs a whole block in one call and one parallel region
(its comment draws the phases); the products are packed_experts.c's own loops, over the prompt's packed experts or a
dense W, so nothing is copied or concatenated for the step. The embedding and the head (final norm, lm_head by
packed_experts.decode_linear) stay in PyTorch: one call each a step. Measured on SmolLM2 (the Xeon, 2 threads, 256
cached tokens): 2.6 ms a step outside the Linears, and μ-MoE at rho 0.5 decoding at 1.66x llama.cpp's F32 tokens/s
(docs/packed_decode.md).

    step = FusedStep(model, cache, products)     where step_problem(model, path) finds nothing against it
    logits = step(next_id)                        (1, 1) token id -> (1, 1, vocab), the token joining the cache

`products`: per decoder nn.Linear, what the step multiplies by: a PackedLinear (the prompt's experts, packed) or a
float32 tensor (d_out, d_in) (W itself for the dense model, or the prompt's W ⊙ M). The eager step,
`model(next_id, linear, cache, decode_linear)`, stays the reference (tests/test_decode_step.py) and the fallback:
mumoe.generate runs this step where `step_problem` finds nothing against it, and says which step ran.

Served: OPT with its LayerNorm before each sub-block (all but OPT-350m), the LLaMA family (LLaMA, Mistral, Qwen2,
Qwen3, Phi-3, and so LLaVA's language model), Gemma 3; batch 1, float32 on the CPU, where the kernel builds.
"""

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F

import packed_experts
from checkpoint import KVCache, UsageError
from packed_experts import PackedLinear, decode_linear

RMS_NORM, LAYER_NORM = 0, 1
ACTIVATIONS = {F.silu: 0, F.relu: 1, F.gelu: 2}  # decode_step.c's codes; Gemma 3's gelu_tanh is 3 (below)
GELU_TANH = 3


class Linear(ctypes.Structure):  # decode_step.c's linear_t
    _fields_ = [("bits", ctypes.c_void_p), ("values", ctypes.c_void_p), ("starts", ctypes.c_void_p),
                ("W", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("d_out", ctypes.c_int64), ("d_in", ctypes.c_int64)]


class Block(ctypes.Structure):  # decode_step.c's block_t, field for field
    _fields_ = [*((name, ctypes.c_int64) for name in ("d", "n_head", "n_kv", "head_dim", "rotary_dim", "ffn",
                                                       "capacity", "window", "norm", "activation", "gated")),
                ("eps", ctypes.c_double), ("scale", ctypes.c_double),
                *((name, ctypes.c_void_p) for name in ("norm1_w", "norm1_b", "norm2_w", "norm2_b", "post1_w", "post2_w",
                                                        "q_norm_w", "k_norm_w", "cos", "sin", "k_cache", "v_cache")),
                ("qkv", Linear * 3), ("o", Linear), ("up", Linear * 2), ("down", Linear)]


def address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


STEPS = ("auto", "fused", "eager")
FUSED_PATHS = ("dense", "packed")  # mumoe.decode_path's answers (and the dense model's) the fused step runs


def step_problem(model, path: str) -> str | None:
    """None where `FusedStep` runs `model`'s decode on `path` (mumoe.generate's: "dense", "packed", "masked",
    "triton"), else why not, in a few words."""
    if path not in FUSED_PATHS:
        return f"the fused step multiplies packed experts or W, not the {path} decode's"
    weight = next(model.parameters())
    problem = packed_experts.kernel_problem(weight.device, weight.dtype)
    if problem is not None:
        return problem
    return next((problem for problem in map(block_problem, model.blocks) if problem is not None), None)


def chosen_step(step: str, model, path: str) -> str | None:
    """`step` ("auto", "fused" or "eager") checked before any work: None where the fused step will run, else why
    the eager one will; "fused" where it cannot run is a UsageError saying why."""
    if step not in STEPS:
        raise UsageError(f"step must be one of {STEPS}, got {step!r}")
    problem = "asked for" if step == "eager" else step_problem(model, path)
    if problem is not None and step == "fused":
        raise UsageError(f"--step fused cannot run here: {problem}")
    return problem


def block_problem(block: nn.Module) -> str | None:
    kind = type(block).__name__
    if kind not in DESCRIBE:
        return f"the fused step does not know a {kind}"
    if kind == "OPTDecoderLayer" and not block.pre_ln:
        return "the fused step runs OPT with its LayerNorms before each sub-block, not OPT-350m's after"
    if any(p.dtype != torch.float32 for p in block.parameters()):
        return "the fused step runs float32 weights"
    if block._forward_pre_hooks or block._forward_hooks:  # checkpoint.offloaded's: the forward moves the block
        return "the blocks have forward hooks (an offloaded model), which the fused step would not call"
    return None


def linear_struct(layer: nn.Linear | None, product) -> Linear:
    if layer is None:
        return Linear()  # absent: d_out 0
    bias = address(layer.bias)
    if isinstance(product, PackedLinear):
        bits, values, starts, _ = product.pointers
        return Linear(bits, values, starts, None, bias, product.d_out, product.d_in)
    return Linear(None, None, None, product.data_ptr(), bias, *product.shape)


def describe_llama(block) -> dict:
    attn, mlp = block.self_attn, block.mlp
    fused = hasattr(attn, "qkv_proj")
    return dict(norm=RMS_NORM, eps=block.input_layernorm.eps, norm1_w=block.input_layernorm.weight,
                norm2_w=block.post_attention_layernorm.weight, scale=attn.head_dim ** -0.5,
                q_norm_w=attn.q_norm.weight if hasattr(attn, "q_norm") else None,
                k_norm_w=attn.k_norm.weight if hasattr(attn, "k_norm") else None,
                qkv=[attn.qkv_proj, None, None] if fused else [attn.q_proj, attn.k_proj, attn.v_proj], o=attn.o_proj,
                up=[mlp.gate_up_proj, None] if fused else [mlp.gate_proj, mlp.up_proj], down=mlp.down_proj,
                gated=1, activation=ACTIVATIONS[mlp.activation], ffn=mlp.down_proj.in_features)


def describe_gemma(block) -> dict:
    attn, mlp = block.self_attn, block.mlp
    one_plus = lambda norm: 1.0 + norm.weight.float()  # noqa: E731  Gemma's RMSNorm scales by (1 + weight)
    return dict(norm=RMS_NORM, eps=block.input_layernorm.eps, norm1_w=one_plus(block.input_layernorm),
                norm2_w=one_plus(block.pre_feedforward_layernorm), post1_w=one_plus(block.post_attention_layernorm),
                post2_w=one_plus(block.post_feedforward_layernorm), scale=attn.scale,
                q_norm_w=one_plus(attn.q_norm), k_norm_w=one_plus(attn.k_norm),
                qkv=[attn.q_proj, attn.k_proj, attn.v_proj], o=attn.o_proj, up=[mlp.gate_proj, mlp.up_proj],
                down=mlp.down_proj, gated=1, activation=GELU_TANH, ffn=mlp.down_proj.in_features)


def describe_opt(block) -> dict:
    attn, ln1, ln2 = block.self_attn, block.self_attn_layer_norm, block.final_layer_norm
    return dict(norm=LAYER_NORM, eps=ln1.eps, norm1_w=ln1.weight, norm1_b=ln1.bias, norm2_w=ln2.weight,
                norm2_b=ln2.bias, scale=attn.scaling, qkv=[attn.q_proj, attn.k_proj, attn.v_proj], o=attn.out_proj,
                up=[block.fc1, None], down=block.fc2, gated=0, activation=ACTIVATIONS[block.activation],
                ffn=block.fc1.out_features)


DESCRIBE = {"LlamaDecoderLayer": describe_llama, "Gemma3DecoderLayer": describe_gemma, "OPTDecoderLayer": describe_opt}


class FusedStep:
    """The decode step of `model` through `cache` (model.new_cache, holding the prompt), each block one C call."""

    def __init__(self, model, cache: list[KVCache], products: dict):
        if cache[0].k.shape[0] != 1:
            raise ValueError(f"the fused step decodes one sequence, the cache holds {cache[0].k.shape[0]}")
        for layer in (layer for block in model.blocks for layer in block.linears().values()):
            product = products[layer]
            if not isinstance(product, PackedLinear) and not (
                    torch.is_tensor(product) and product.dtype == torch.float32 and product.is_cpu
                    and product.is_contiguous() and product.shape == layer.weight.shape):
                raise ValueError("each decoder Linear needs its packed experts or a contiguous float32 W on the CPU")
        self.model, self.cache, self.lib = model, cache, packed_experts.loaded_kernel()
        self.keep = [products]  # every tensor the structs point to, alive as long as they are
        self.tables = {}  # a rotary table per distinct inv_freq: (the attention that computes it, cos, sin)
        structs = [self.block_struct(block, block_cache, products) for block, block_cache in zip(model.blocks, cache)]
        self.keep += structs
        self.blocks = [ctypes.byref(struct) for struct in structs]
        self.scratch = torch.empty(max(2 * b.d + (2 * b.n_head + 2 * b.n_kv) * b.head_dim + 2 * b.ffn
                                       + b.n_head * b.capacity for b in structs))  # decode_block's scratch

    def block_struct(self, block: nn.Module, cache: KVCache, products: dict) -> Block:
        """decode_block's description of `block`: its sizes, norms, rotary table, cache and products."""
        fields, attn = DESCRIBE[type(block).__name__](block), block.self_attn
        _, n_kv, capacity, head_dim = cache.k.shape
        struct = Block(d=fields["o"].out_features, n_head=attn.n_head, n_kv=n_kv, head_dim=head_dim, ffn=fields["ffn"],
                       capacity=capacity, window=getattr(attn, "window", None) or 0, norm=fields["norm"],
                       activation=fields["activation"], gated=fields["gated"], eps=fields["eps"], scale=fields["scale"],
                       k_cache=cache.k.data_ptr(), v_cache=cache.v.data_ptr())
        for name in ("norm1_w", "norm1_b", "norm2_w", "norm2_b", "post1_w", "post2_w", "q_norm_w", "k_norm_w"):
            t = fields.get(name)
            if t is not None:
                t = t.detach().float().contiguous()
                self.keep.append(t)
            setattr(struct, name, address(t))
        if hasattr(attn, "inv_freq"):  # RoPE (OPT has learned positions, added by its embed)
            key = tuple(attn.inv_freq.tolist())
            if key not in self.tables:
                rd = 2 * attn.inv_freq.numel()
                self.tables[key] = (attn, torch.zeros(rd), torch.zeros(rd))
            _, cos, sin = self.tables[key]
            struct.rotary_dim, struct.cos, struct.sin = cos.numel(), cos.data_ptr(), sin.data_ptr()
        for i, layer in enumerate(fields["qkv"]):
            struct.qkv[i] = linear_struct(layer, products.get(layer))
        for i, layer in enumerate(fields["up"]):
            struct.up[i] = linear_struct(layer, products.get(layer))
        struct.o = linear_struct(fields["o"], products[fields["o"]])
        struct.down = linear_struct(fields["down"], products[fields["down"]])
        return struct

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (1, 1) -> logits (1, 1, vocab); the token's keys and values join the cache."""
        pos = self.cache[0].length
        if pos >= self.cache[0].k.shape[2]:
            raise ValueError(f"{pos + 1} tokens overflow a KV cache allocated for {self.cache[0].k.shape[2]}")
        x = self.model.embed(ids, pos).contiguous()  # (1, 1, d), float32
        for attn, cos, sin in self.tables.values():
            c, s = attn.rotary(pos, 1, torch.float32)
            cos.copy_(c[0]), sin.copy_(s[0])
        threads, scratch, x_ptr = torch.get_num_threads(), self.scratch.data_ptr(), x.data_ptr()
        for block in self.blocks:
            self.lib.decode_block(block, x_ptr, pos, scratch, threads)
        for block_cache in self.cache:
            block_cache.length = pos + 1
        return self.model.head(x, decode_linear)
