"""Attention of timm ViTs, computed and observed one block of query rows at a time.

Inside :func:`observe_attention` every supported attention module runs an explicit forward:
for one block of query rows at a time it computes the pre-softmax logits (in fp32, whatever the
model's dtype), the softmax, the block's output rows, and hands the post-softmax rows to an
observer that reduces them to statistics. No [B, H, N, N] map of a whole layer ever exists: the
largest buffer is one block of rows, a few MiB (see :func:`rows_per_block`).

:func:`qk_logits` is what NMI-HAD distils (method.md section 2): the scaled query-key product
plus whatever the block adds before its softmax. The analysis, the teacher and the student all
compute it here. Supported attention classes and what each adds before the softmax:

- timm ``Attention`` (ViT, DeiT, DINOv2, CLIP, SigLIP, registers): q/k norm where configured;
- BEiT ``beit.Attention``: relative position bias (its own table and/or the model's shared one);
- EVA ``EvaAttention`` and ``AttentionRope``: rotary embedding of the patch tokens' q and k.

Any other attention class is refused with an error that names it.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from timm.layers import apply_rot_embed_cat
from timm.layers.attention import Attention, AttentionRope
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.eva import Eva, EvaAttention, EvaBlockPostNorm
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from .errors import SpecError

SUPPORTED_ATTENTION: tuple[type, ...] = (Attention, BeitAttention, EvaAttention, AttentionRope)
SUPPORTED_MODELS: tuple[type, ...] = (VisionTransformer, Beit, Eva)
# Blocks that normalise after attention: the attention's input is not norm1(x) there.
_POST_NORM_BLOCKS: tuple[type, ...] = (ResPostBlock, EvaBlockPostNorm)

# One block of query rows holds at most this many bytes of fp32 logits: small enough that the
# products q @ k^T and p @ v run near full speed (127 rows of 4,097 tokens: 0.9x the time of
# timm's fused attention for the same rows on the project's CPU, against 1.1x at 255 rows), large
# enough that per-block overhead is negligible (benchmarks/RESULTS.md, issue 29).
DEFAULT_BLOCK_BYTES = 2 * 2**20
# Query rows a block should hold per (image, head) for the two products to run at full speed.
MIN_BLOCK_ROWS = 128
# On the CPU, layers whose maps would take at least this many bytes run their head groups in
# parallel threads (_in_threads); below it, starting the threads costs more than they save
# (ViT-B/16 at 224 px, batch 8: 15 MB of maps a layer, 1.20-1.24x plain with threads, 0.98x without).
THREADS_FROM_BYTES = 64 * 2**20


def head_group_threads(batch: int, heads: int, tokens: int, groups: int) -> int:
    """Threads a CPU layer of the analysis runs its ``groups`` head groups in (1: none): torch's
    thread count from ``THREADS_FROM_BYTES`` of maps a layer on."""
    if batch * heads * tokens**2 * 4 < THREADS_FROM_BYTES:
        return 1
    return max(1, min(torch.get_num_threads(), groups))


# --- which models and attention classes are supported ----------------------------------------


def _class_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_supported(model: torch.nn.Module, what: str = "the model") -> None:
    """Raise :class:`SpecError` naming the class unless every block's attention can be captured."""
    if not isinstance(model, SUPPORTED_MODELS):
        raise SpecError(
            f"{what} is a {_class_name(model)}; attention analysis supports timm's VisionTransformer, "
            "Beit and Eva models"
        )
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if isinstance(blk, _POST_NORM_BLOCKS):
            raise SpecError(
                f"{what}: block {i + 1} is a {_class_name(blk)} (normalisation after attention), "
                "which the capture does not support"
            )
        if type(attn) not in SUPPORTED_ATTENTION:
            found = _class_name(attn) if attn is not None else f"{_class_name(blk)} without an .attn module"
            names = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in SUPPORTED_ATTENTION)
            raise SpecError(
                f"{what}: block {i + 1} uses {found}, an attention class the capture does not support "
                f"(supported: {names})"
            )


# --- what each attention class computes -----------------------------------------------------


def project_qkv(
    attn: torch.nn.Module, x: torch.Tensor, **context: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as [B, heads, N, head_dim], exactly as the attention module computes them before
    its softmax: projection (fused or separate, BEiT/EVA's q/v-only bias), q/k norm, and the
    rotary embedding of the patch tokens when the block passes ``rope``.

    ``x`` is the attention module's input (the block's ``norm1`` output); ``context`` the keyword
    arguments the block passes to its attention (``rope``, ``shared_rel_pos_bias``)."""
    B, N, _ = x.shape
    heads = attn.num_heads
    if getattr(attn, "qkv", None) is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:  # BEiT / EVA: learned q and v biases, k bias fixed at zero
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            if getattr(attn, "qkv_bias_separate", False):
                qkv = attn.qkv(x) + bias
            else:
                qkv = torch.nn.functional.linear(x, attn.qkv.weight, bias)
        q, k, v = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:  # separate projections; k/v may have fewer heads (grouped-query attention)
        kv_heads = getattr(attn, "num_kv_heads", heads)
        q = attn.q_proj(x).reshape(B, N, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    rope = context.get("rope")
    if rope is not None:
        npt = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return q, k, v


def logit_bias(
    attn: torch.nn.Module, context: Mapping[str, Any], q0: int = 0, q1: int | None = None
) -> torch.Tensor | None:
    """What the block adds to the logits of query rows ``q0:q1`` before the softmax:
    [1 or B, heads, rows, N], or ``None``. BEiT: its relative position bias table indexed by
    (query, key) position, plus the model's shared table when the block receives one."""
    bias = None
    table = getattr(attn, "relative_position_bias_table", None)
    if table is not None:
        index = attn.relative_position_index[q0:q1]  # [rows, N]
        rows, n = index.shape
        bias = table[index.reshape(-1)].view(rows, n, -1).permute(2, 0, 1).unsqueeze(0)
    shared = context.get("shared_rel_pos_bias")
    if shared is not None:
        rows = shared[..., q0:q1, :]
        bias = rows if bias is None else bias + rows
    return bias


def qk_logits(attn: torch.nn.Module, x: torch.Tensor, **context: Any) -> torch.Tensor:
    """Pre-softmax logits ``(q @ k^T) * head_dim^-0.5 (+ the block's position bias)``: [B, heads, N, N].

    ``x`` is the attention module's input (the block's ``norm1`` output); ``context`` what the
    block passes to its attention (EVA's ``rope``, BEiT's ``shared_rel_pos_bias``): see
    :func:`block_context`. Computed in the inputs' dtype, as the module computes it."""
    _refuse_masks(attn, context)
    q, k, _ = project_qkv(attn, x, **context)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    bias = logit_bias(attn, context)
    return logits if bias is None else logits + bias


def attention_output(attn: torch.nn.Module, heads_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The module's output from ``softmax(logits) @ v`` ([B, heads, N, head_dim]): merge heads,
    then the output norm and gate where the class has them, projection, dropout."""
    B, N, _ = x.shape
    out = heads_out.transpose(1, 2).reshape(B, N, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _refuse_masks(attn: torch.nn.Module, context: Mapping[str, Any]) -> None:
    if context.get("attn_mask") is not None or context.get("is_causal"):
        raise SpecError(
            f"{type(attn).__name__} was called with an attention mask; the capture analyses "
            "unmasked self-attention only"
        )


# --- blocks of query rows ----------------------------------------------------------------------


def rows_per_block(batch: int, heads: int, tokens: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Query rows per block of ``heads`` heads: as many as fit ``block_bytes`` of fp32 logits, and
    never more than half the rows, so that no block is a layer's whole map."""
    per_row = batch * heads * tokens * 4
    return max(1, min(math.ceil(tokens / 2), block_bytes // per_row))


def heads_per_block(batch: int, heads: int, tokens: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Heads per block: all of them while a block still holds ``MIN_BLOCK_ROWS`` query rows (or
    the most it may take), else as few equal groups as give it that many. At high resolution a block of every head holds a
    few dozen rows, and each (image, head) product ``q @ k^T`` then re-packs the whole of ``k``
    for those few rows: at 4,097 tokens the two products cost 1.4x what they cost on 256 rows."""
    target = min(MIN_BLOCK_ROWS, math.ceil(tokens / 2))  # a block never takes more than half the rows
    if rows_per_block(batch, heads, tokens, block_bytes) >= target:
        return heads
    fit = max(1, block_bytes // (batch * tokens * 4 * target))
    groups = math.ceil(heads / fit)
    return math.ceil(heads / groups)


def query_blocks(tokens: int, num_prefix_tokens: int, rows: int) -> Iterator[tuple[int, int]]:
    """``[q0, q1)`` ranges covering every query row: the prefix tokens' rows alone first, then the
    patch rows ``rows`` at a time, so that a block never mixes prefix and patch queries."""
    if num_prefix_tokens:
        yield 0, num_prefix_tokens
    for q0 in range(num_prefix_tokens, tokens, rows):
        yield q0, min(tokens, q0 + rows)


# --- observing ---------------------------------------------------------------------------------


class AttentionObserver(Protocol):
    """Receives each observed layer's post-softmax attention, one block of query rows at a time."""

    def start_layer(self, layer: int, shape: tuple[int, int, int]) -> None:
        """Layer ``layer`` (0-based) begins; its map would be [batch, heads, tokens, tokens]."""

    def rows(self, layer: int, q0: int, probs: torch.Tensor, h0: int = 0) -> None:
        """Rows ``q0 : q0 + probs.shape[2]`` of heads ``h0 : h0 + probs.shape[1]`` of the map, fp32
        [batch, heads in the block, rows, tokens], prefix tokens included. At high resolution a
        block holds a group of heads (see :func:`heads_per_block`); each (head, row) arrives
        once. The block's output rows are already computed: the observer owns ``probs`` and may
        overwrite it."""

    def end_layer(self, layer: int) -> None:
        """Every row of layer ``layer`` has been delivered."""


class SoftmaxObserver(AttentionObserver, Protocol):
    """An observer that takes each block's softmax itself, reducing the rows while it computes
    them (the analysis: unip_analysis.kernels.softmax_rows); its ``rows`` is then not called."""

    def softmax_rows(self, layer: int, q0: int, logits: torch.Tensor, h0: int = 0) -> torch.Tensor:
        """Rows ``q0 : q0 + logits.shape[2]`` of heads ``h0 : h0 + logits.shape[1]``, fp32 logits
        [batch, heads in the block, rows, tokens], prefix tokens included, owned by the observer:
        return their softmax over the last dim (in the same storage or not), which the block's
        output rows are then computed from."""


class ProjectionObserver(AttentionObserver, Protocol):
    """An observer that also wants each layer's logit inputs (the attention explorer stores them):
    called once per layer, before its rows."""

    def projections(
        self,
        layer: int,
        q: torch.Tensor,
        scale: float,
        k: torch.Tensor,
        bias: Callable[[], torch.Tensor | None],
    ) -> None:
        """``q`` and ``k`` [batch, heads, tokens, head_dim] after q/k norm and rotary embedding (k
        fp32, q in the model's dtype) so that ``(q.float() * scale) @ k^T + bias()`` are the layer's
        logits as the analysis computes them; ``bias()`` computes the block's additive term
        ([1, heads, tokens, tokens] for a block's own table, [heads, tokens, tokens] for BEiT's
        shared one, or None)."""


def _in_threads(fn: Callable[[Sequence[int]], None], parts: list[Sequence[int]]) -> None:
    """``fn(part)`` for every part at once, one thread each, every torch op single-threaded.

    On the CPU the two products of a block of 127 rows hardly gain from a second thread, while
    timm's fused attention, which the analysis is compared with, splits its work across heads.
    So the analysis does the same: each thread takes whole head groups (the statistics of a head
    are then only ever written by one thread; the kernel and the products release the GIL).
    torch's thread count is process-wide: it is 1 while the threads run, then restored."""
    before = torch.get_num_threads()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(part: Sequence[int]) -> None:
        torch.set_num_threads(1)  # this thread's OpenMP setting too
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(part)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(len(parts), thread_name_prefix="unip-attention") as pool:
            list(pool.map(run, parts))
    finally:
        torch.set_num_threads(before)


def _streaming_forward(layer: int, observer: AttentionObserver, num_prefix_tokens: int, block_bytes: int):
    def forward(self: torch.nn.Module, x: torch.Tensor, **context: Any) -> torch.Tensor:
        _refuse_masks(self, context)
        q, k, v = project_qkv(self, x, **context)
        batch, heads, tokens, _ = q.shape
        observer.start_layer(layer, (batch, heads, tokens))
        group = heads_per_block(batch, heads, tokens, block_bytes)
        rows = rows_per_block(batch, group, tokens, block_bytes)
        heads_out = torch.empty_like(v)
        # Logits and softmax in fp32 whatever autocast chose for the projections: half-precision
        # logits can overflow and would put rounding noise into every statistic.
        with torch.autocast(x.device.type, enabled=False):
            take = getattr(observer, "projections", None)
            if take is not None:  # the explorer: this layer's q and k, as the logits below use them
                take(layer, q, self.scale, k.float(), lambda: logit_bias(self, context))
            # q, k, v are views into one fused projection. Contiguous copies per group of heads,
            # made once per layer (q scaled, q and k in fp32), free it (the copies take the
            # same memory) and spare every block's products a copy.
            starts = range(0, heads, group)
            q_g = [(q[:, h0 : h0 + group].float() * self.scale).flatten(0, 1) for h0 in starts]
            k_g = [k[:, h0 : h0 + group].float().contiguous().flatten(0, 1) for h0 in starts]
            v_g = [v[:, h0 : h0 + group].contiguous() for h0 in starts]
            del q, k, v
            fused = getattr(observer, "softmax_rows", None)
            most = max(rows, num_prefix_tokens)  # the prefix rows come as one block of their own

            def blocks_of(groups: Sequence[int]) -> None:
                """Every block of rows of the head groups ``groups``, in row order."""
                buffer = torch.empty(batch * group * most * tokens, device=x.device)  # one block's logits
                for q0, q1 in query_blocks(tokens, num_prefix_tokens, rows):
                    bias = logit_bias(self, context, q0, q1)
                    for g in groups:
                        h0, n_h = starts[g], q_g[g].shape[0] // batch
                        logits = buffer[: batch * n_h * (q1 - q0) * tokens].view(batch * n_h, q1 - q0, tokens)
                        torch.bmm(
                            q_g[g][:, q0:q1], k_g[g].transpose(1, 2), out=logits
                        )  # BLAS reads k^T as is
                        logits = logits.view(batch, n_h, q1 - q0, tokens)
                        if bias is not None:
                            logits += bias if bias.shape[-3] == 1 else bias[..., h0 : h0 + n_h, :, :]
                        # the observer either takes the softmax itself (reducing the rows as it
                        # goes) or receives the probabilities once the block's output rows exist
                        probs = logits.softmax(dim=-1) if fused is None else fused(layer, q0, logits, h0)
                        heads_out[:, h0 : h0 + n_h, q0:q1] = self.attn_drop(probs).to(v_g[g].dtype) @ v_g[g]
                        if fused is None:
                            observer.rows(layer, q0, probs, h0)
                        del probs, logits

            workers = 1
            if fused is not None and x.device.type == "cpu":
                workers = head_group_threads(batch, heads, tokens, len(starts))
            if workers == 1:
                blocks_of(range(len(starts)))
            else:
                _in_threads(blocks_of, [range(i, len(starts), workers) for i in range(workers)])
        observer.end_layer(layer)
        return attention_output(self, heads_out, x)

    return forward


@contextmanager
def observe_attention(
    model: torch.nn.Module,
    observer: AttentionObserver,
    layers: Sequence[int] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Iterator[None]:
    """Within the context, every forward of ``model`` hands each block's attention to ``observer``
    a block of query rows at a time (see :class:`AttentionObserver`); the model's outputs are the
    same as without observation (up to float rounding). ``layers`` limits observation to some
    blocks (0-based). Unsupported attention classes are refused, naming the class."""
    check_supported(model)
    blocks = list(model.blocks)
    chosen = range(len(blocks)) if layers is None else layers
    npt = int(model.num_prefix_tokens)
    patched = []
    try:
        for i in chosen:
            attn = blocks[i].attn
            attn.forward = types.MethodType(_streaming_forward(i, observer, npt, block_bytes), attn)
            patched.append(attn)
        yield
    finally:
        for attn in patched:
            del attn.forward  # falls back to the class's forward


class AttentionMaps:
    """An observer that assembles each layer's full map [B, H, N, N] (fp32, prefix tokens included).

    For tests and small inputs only: it holds every layer's map, which is exactly what the
    streaming analysis avoids."""

    def __init__(self) -> None:
        self.maps: dict[int, torch.Tensor] = {}
        self._heads = 0

    def start_layer(self, layer: int, shape: tuple[int, int, int]) -> None:
        self.maps.pop(layer, None)
        self._heads = shape[1]

    def rows(self, layer: int, q0: int, probs: torch.Tensor, h0: int = 0) -> None:
        b, h, r, n = probs.shape
        if layer not in self.maps:
            self.maps[layer] = probs.new_empty(b, self._heads, n, n)
        self.maps[layer][:, h0 : h0 + h, q0 : q0 + r] = probs

    def end_layer(self, layer: int) -> None:
        pass


def attention_maps(model: torch.nn.Module, images: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's full post-softmax map for ``images`` (tests and small inputs: O(depth N^2))."""
    collector = AttentionMaps()
    with torch.no_grad(), observe_attention(model, collector):
        model.forward_features(images)
    return collector.maps


# --- running a model part of the way -----------------------------------------------------------


def block_context(model: torch.nn.Module) -> Callable[[int], dict]:
    """``context(i)``: the keyword arguments block ``i`` passes on to its attention (EVA's rotary
    embedding, BEiT's shared relative position bias), as the model's own forward computes them."""
    if isinstance(model, Eva):
        rope = _eva_rope(model)
        if rope is not None and getattr(model, "rope_mixed", False):
            return lambda i: {"rope": rope[i]}  # one embedding per block
        return lambda i: {"rope": rope}
    if isinstance(model, Beit) and model.rel_pos_bias is not None:
        shared = model.rel_pos_bias()
        return lambda i: {"shared_rel_pos_bias": shared}
    return lambda i: {}


def _eva_rope(model: Eva) -> torch.Tensor | None:
    if model.rope is None:
        return None
    if hasattr(model.rope, "feat_shape"):
        return model.rope.get_embed()
    return model.rope.get_embed(shape=model.patch_embed.grid_size)


def embed_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Token sequence entering block 0: patch embedding, prefix tokens, position embedding,
    pre-norm, as the model's ``forward_features`` computes it."""
    x = model.patch_embed(images)
    if isinstance(model, Eva):
        x, _ = model._pos_embed(x)  # the rotary embedding comes from block_context
    elif isinstance(model, Beit):
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        return model.pos_drop(x)
    else:
        x = model._pos_embed(x)
        x = model.patch_drop(x)
    return model.norm_pre(x)


def run_until(model: torch.nn.Module, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, dict]:
    """(token sequence entering block ``layer`` (0-based), the keyword arguments the model passes
    that block's attention): embedding, prefix tokens, position embedding, then blocks
    ``0 .. layer-1`` with their :func:`block_context`. Nothing after that is computed."""
    context = block_context(model)
    tokens = embed_tokens(model, x)
    for i, blk in enumerate(model.blocks[:layer]):
        tokens = blk(tokens, **context(i))
    return tokens, context(layer)


def forward_until(model: torch.nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Token sequence entering block ``layer`` (0-based): see :func:`run_until`."""
    return run_until(model, x, layer)[0]


def block_qk_logits(block: torch.nn.Module, tokens: torch.Tensor, context: Mapping[str, Any]) -> torch.Tensor:
    """Pre-softmax logits of a pre-norm ``block`` for the ``tokens`` entering it, ``context`` being
    what the model passes its attention (:func:`run_until`): ``qk_logits(attn, norm1(tokens))``."""
    return qk_logits(block.attn, block.norm1(tokens), **context)


def layer_qk_logits(model: torch.nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Pre-softmax logits of block ``layer`` (0-based) for images ``x``, running only up to it.
    The NMI-HAD teacher computes exactly this (in fp32)."""
    tokens, context = run_until(model, x, layer)
    return block_qk_logits(model.blocks[layer], tokens, context)
